"""Everything around the model that a training, evaluation or serving run needs, one room per concern:

- ``data``: storage (local or S3), manifests, catalogs, importers, the layouts people have, ``--data`` (sources),
  the input pipeline and its transforms, part segmentation, the demo generators;
- ``train``: the trainer, optimiser, distributed helpers, checkpoints, model selection (validation), job configs
  (presets + YAML + flags), the Ray Train job and tuning;
- ``tracking``: the MLflow model registry and training runs (logger, retry, backfill);
- ``evaluation``: streaming metrics, the evaluation report and the demo's HTML/Markdown report;
- ``promotion``: the gates that move a model version to ``champion``;
- ``cluster``: connecting to Ray and checkpoint storage; local servers for development and tests (S3, MLflow, a
  Ray head, the three as one stack).

Nothing here imports ``anomalymoe.serve`` (serving imports the platform for what it needs); ``anomalymoe.models``
imports nothing from here."""
