"""The model, free of the platform (it imports nothing from ``anomalymoe.platform``): ``config`` (one typed config,
presets), ``model`` (``AnomalyMoE``: backbone, experts, router, scoring), ``calibration`` (what is fitted on normal
images after training: ``fit_calibration``, ``fit_part_bank``), ``backbone``, ``experts`` (patch, global, component),
``router``, ``losses``, ``scoring`` (what calibration holds, fusion), ``parts`` and ``layout`` (the component level's
masks, part bank and occupancy priors), ``artifact`` (save/load without pickle), ``weights_source`` (how an ``s3://``
weights URI becomes a file: the platform's storage registers its fetcher), ``precision``, ``offline_weights``
(DINOv2-S from a registry package)."""
