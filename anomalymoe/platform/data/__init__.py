"""Data: ``storage`` (one API over local paths and S3), ``manifest`` (the table every job reads, its checks and hash),
``catalog`` (datasets by domain), ``importers`` (public datasets into the MVTec layout), ``layouts`` (MVTec, flat,
CSV/Parquet lists), ``sources`` (what ``--data`` means), ``pipeline`` (which rows an epoch sees, decoding them
in-process or in Ray Data tasks), ``transforms`` (``Frame``/``Framing`` and decoding: how an image becomes model
input, the same in training, evaluation and serving), ``segmentation`` (part clusters), ``demo`` (the built-in
textures and objects generators)."""
