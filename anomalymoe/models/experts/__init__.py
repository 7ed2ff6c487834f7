"""The three kinds of expert, one module each: ``patch`` (local appearance: reconstruct tokens), ``component``
(parts: features pooled under part masks) and ``global_`` (the whole image: student/autoencoder; the trailing
underscore because ``global`` is a Python keyword)."""
