"""The model benchmark: backbone alone, sparse vs dense `predict`, our train step vs the reference's, peak memory,
and the float32 sparse-vs-dense difference, on one device in one run (ratios stay meaningful on a noisy machine).

    python jobs/benchmark.py model --json                                            # CPU, ViT-S/14 at 224 px
    python jobs/benchmark.py model --device cuda --preset reference --dtype bf16 --json  # one GPU, issue 12
    python jobs/benchmark.py model --device cpu --preset test-tiny --json            # the same code paths, seconds

On CUDA every timing is bracketed by a device synchronisation; a batch size that does not fit is reported as
out of memory, not a crash."""

from __future__ import annotations

import copy
import platform
import resource
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from anomalymoe.models.config import LEVELS, presets
from anomalymoe.models.model import AnomalyMoE, MoEOutput
from anomalymoe.models.precision import DTYPES, autocast, device_of
from anomalymoe.platform.train.trainer import TrainConfig, Trainer


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_batch(b: int, size: int, parts: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Random images plus `parts` rectangular part masks per image (so component experts have input)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, size, size, generator=g) * torch.linspace(0.2, 1.0, b)[:, None, None, None]
    masks = []
    for _ in range(b):
        m = torch.zeros(parts, size, size, dtype=torch.bool)
        for k in range(parts):
            y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
            m[k, y : y + size // 3, x : x + size // 3] = True
        masks.append(m)
    return images, masks


def expert_diff(s: MoEOutput, d: MoEOutput) -> float:
    """Largest |sparse - dense| over every selected expert output (dense rows picked at the sparse indices)."""
    diffs = [0.0]
    for j, po in s.patch.items():
        diffs += [float((a.float() - b[po.idx].float()).abs().max()) for a, b in zip(po.de, d.patch[j].de, strict=True)]
    for j, go in s.global_.items():
        diffs += [float((go.ae.float() - d.global_[j].ae[go.idx].float()).abs().max()),
                  float((go.student.float() - d.global_[j].student[go.idx].float()).abs().max())]
    for j, co in s.component.items():
        diffs.append(float((co.recon.float() - d.component[j].recon[co.cidx].float()).abs().max()))
    return max(diffs)


class Clock:
    """Wall time of a callable on `device` (synchronised on CUDA), and the peak device memory it reached."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def times(self, fn, reps: int, warmup: int = 1) -> dict:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            for _ in range(warmup):
                fn()
            out = []
            for _ in range(reps):
                self.sync()
                t = time.perf_counter()
                fn()
                self.sync()
                out.append(time.perf_counter() - t)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return {"s": None, "oom": True}
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        return {"s": statistics.median(out), "peak_gib": peak}


def _spread(model: AnomalyMoE, seed: int) -> None:
    """The reference init (std 0.01) sends every image to the same experts; a balanced, ESB-trained router spreads
    them. Re-draw the gate so routing is spread (the result says how)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.router.parameters():
        p.data = (torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.5)).to(p)


def _ips(b: int, r: dict) -> float | None:
    return None if r["s"] is None else b / r["s"]


def bench_model(args) -> dict:
    device = device_of(args.device)
    explicit = args.device is not None
    predict_batches = args.predict_batches or ([32, 128] if explicit else [args.batch_size])
    train_batches = args.train_batches or ([16, 64] if explicit else [args.batch_size])
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    cfg = presets()[args.preset].model_copy(deep=True)
    if cfg.backbone.weights is None and cfg.backbone.name != "test_tiny_vit":
        print(f"[bench] {cfg.backbone.name} with random weights: speed does not depend on them", flush=True)
    sparse = AnomalyMoE(cfg)
    if args.spread_router:
        _spread(sparse, args.seed)
    dense = copy.deepcopy(sparse)
    dense.cfg = cfg.model_copy(update={"execution": "dense"})
    for m in (sparse, dense):
        m.to_device(device).eval()
        m.inference_precision = dtype
    clock = Clock(device)
    size = cfg.backbone.img_size
    batch = {b: synthetic_batch(b, size, args.parts, args.seed) for b in {*predict_batches, *train_batches}}

    def on(b: int):
        images, masks = batch[b]
        return images.to(device), [m.to(device) for m in masks]

    res_predict, res_backbone = {}, {}
    with torch.no_grad():
        # float32 parity of sparse and dense execution (TF32 off: both must compute the same products)
        b0 = predict_batches[0]
        images, masks = on(b0)
        tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        for m in (sparse, dense):
            m.inference_precision = "fp32"
        out_s, out_d = sparse(images, masks), dense(images, masks)
        diff_experts = expert_diff(out_s, out_d)
        diff_maps = float((sparse.predict(images, masks).anomaly_map - dense.predict(images, masks).anomaly_map)
                          .abs().max())
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        for m in (sparse, dense):
            m.inference_precision = dtype
        sel = out_s.routing.mask.float()
        share = {lv: float(sel[:, out_s.routing.level_slices[lv]].sum() / sel.sum()) for lv in LEVELS}
        experts_used = int(out_s.routing.mask.any(0).sum())
        del out_s, out_d
        for b in predict_batches:
            images, masks = on(b)
            with autocast(device, dtype):
                res_backbone[b] = clock.times(lambda images=images: sparse.backbone(images), args.reps)
            res_predict[b] = {mode: clock.times(lambda m=m, images=images, masks=masks: m.predict(images, masks),
                                                args.reps)
                              for mode, m in (("sparse", sparse), ("dense", dense))}
            # the forward alone (no maps, no fusion): what the experts cost on top of the backbone
            with autocast(device, dtype):
                res_predict[b]["forward"] = clock.times(
                    lambda images=images, masks=masks: sparse(images, masks, compute_targets=False), args.reps)

    # training: ours (sparse, jittered pass only where needed, estimator on detached features) vs the reference
    # (dense experts, jittered pass for all, a second full forward for the estimator)
    res_train = {}
    for b in train_batches:
        images, masks = on(b)
        tcfg = TrainConfig(steps=1000, batch_size=b, warmup_steps=10)
        res_train[b] = {}
        for mode, base, ref in (("ours", sparse, False), ("reference", dense, True)):
            trainer = Trainer(copy.deepcopy(base), tcfg, reference_mode=ref, precision=dtype)
            res_train[b][mode] = clock.times(lambda t=trainer, images=images, masks=masks: t.step(images, masks),
                                             args.train_reps)
            del trainer
            if device.type == "cuda":
                torch.cuda.empty_cache()

    pb, tb = predict_batches, train_batches
    bb = max(pb)
    res = {
        "benchmark": "model",
        "config": {"preset": args.preset, "backbone": cfg.backbone.name, "weights": cfg.backbone.weights,
                   "img_size": size, "experts": cfg.num_experts, "router": cfg.router.mode,
                   "top_k": cfg.router.top_k, "decoder_depth": cfg.patch.decoder_depth,
                   "predict_batches": pb, "train_batches": tb, "parts_per_image": args.parts, "dtype": dtype,
                   "device": str(device), "threads": torch.get_num_threads(), "spread_router": args.spread_router},
        "params": {
            "trainable": sum(v.numel() for v in sparse.trainable_state_dict().values()),
            "backbone": sum(p.numel() for p in sparse.backbone.parameters()),
            **{lv: sum(p.numel() for p in mods.parameters()) for lv, mods in
               (("patch", sparse.patch_experts), ("global", sparse.global_experts),
                ("component", sparse.component_experts), ("router", sparse.router))}},
        "routing_share": share,
        "experts_used_in_batch": experts_used,
        "backbone_img_per_s": {str(b): _ips(b, res_backbone[b]) for b in pb},
        "predict_img_per_s": {str(b): {k: _ips(b, v) for k, v in res_predict[b].items()} for b in pb},
        "train_img_per_s": {str(b): {k: _ips(b, v) for k, v in res_train[b].items()} for b in tb},
        "peak_gib": {"predict": {str(b): {k: v.get("peak_gib") for k, v in res_predict[b].items()} for b in pb},
                     "train": {str(b): {k: v.get("peak_gib") for k, v in res_train[b].items()} for b in tb}},
        "max_abs_diff_fp32": max(diff_experts, diff_maps),
        "max_abs_diff_experts": diff_experts,
        "max_abs_diff_maps": diff_maps,
        "reps": {"inference": args.reps, "train": args.train_reps},
        "peak_rss_mb": peak_rss_mb(),
        "machine": (torch.cuda.get_device_name(device) if device.type == "cuda" else
                    f"{platform.machine()} {torch.get_num_threads()} threads") + f", torch {torch.__version__}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "command": "python jobs/benchmark.py " + " ".join(getattr(args, "argv", ["model"])),
    }
    sp, de = res["predict_img_per_s"][str(bb)]["sparse"], res["predict_img_per_s"][str(bb)]["dense"]
    res["sparse_over_dense"] = sp / de if sp and de else None
    bbs = res["backbone_img_per_s"][str(bb)]
    res["backbone_over_predict"] = bbs / sp if sp and bbs else None
    tr = res["train_img_per_s"][str(tb[0])]
    res["train_ours_over_reference"] = tr["ours"] / tr["reference"] if tr["ours"] and tr["reference"] else None
    # the figures of earlier READMEs (one batch size): kept under their names
    b1 = str(pb[0])
    res["sparse_img_per_s"] = res["predict_img_per_s"][b1]["sparse"]
    res["dense_img_per_s"] = res["predict_img_per_s"][b1]["dense"]
    res["max_abs_diff"] = res["max_abs_diff_fp32"]
    return res


def _fmt(v: float | None, unit: str = "") -> str:
    return "OOM" if v is None else f"{v:,.1f}{unit}"


def table(res: dict) -> str:
    c = res["config"]
    lines = [f"{c['backbone']} @ {c['img_size']} px, experts {'/'.join(str(v) for v in c['experts'].values())}, "
             f"{c['router']} top-{c['top_k']}, {c['dtype']} on {res['machine']}",
             f"routing share p/g/c {' / '.join(f'{v:.2f}' for v in res['routing_share'].values())}, "
             f"{res['experts_used_in_batch']} experts used; trainable params {res['params']['trainable'] / 1e6:.1f} M",
             "", "| what | batch | img/s | peak GiB |", "|---|---:|---:|---:|"]
    for b, v in res["backbone_img_per_s"].items():
        lines.append(f"| backbone alone | {b} | {_fmt(v)} | |")
    for b, modes in res["predict_img_per_s"].items():
        for k, v in modes.items():
            name = {"sparse": "predict() sparse", "dense": "predict() dense (reference)",
                    "forward": "forward only, sparse"}[k]
            pk = res["peak_gib"]["predict"][b].get(k)
            lines.append(f"| {name} | {b} | {_fmt(v)} | {'' if pk is None else f'{pk:.1f}'} |")
    for b, modes in res["train_img_per_s"].items():
        for k, v in modes.items():
            pk = res["peak_gib"]["train"][b].get(k)
            lines.append(f"| train step, {k} | {b} | {_fmt(v)} | {'' if pk is None else f'{pk:.1f}'} |")
    def x(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}x"

    lines += ["", f"sparse / dense predict: {x(res['sparse_over_dense'])}; backbone / sparse predict: "
              f"{x(res['backbone_over_predict'])}; train ours / reference: {x(res['train_ours_over_reference'])}; "
              f"max |sparse - dense| (fp32): {res['max_abs_diff_fp32']:.2e}"]
    return "\n".join(lines)


def add_arguments(m) -> None:
    m.add_argument("--preset", default="cpu", choices=sorted(presets()),
                   help="model config (default: reference shape at ViT-S/14, 224 px, 6/6/6 experts, top-3)")
    m.add_argument("--device", default=None, help="cpu | cuda | auto; given, the batch sizes default to the GPU "
                                                  "set (predict 32,128; train 16,64)")
    m.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on a CPU")
    m.add_argument("--batch-size", type=int, default=8, help="the one batch size when --device is not given")
    m.add_argument("--predict-batches", type=lambda s: [int(x) for x in s.split(",")], default=None)
    m.add_argument("--train-batches", type=lambda s: [int(x) for x in s.split(",")], default=None)
    m.add_argument("--parts", type=int, default=3, help="component masks per image")
    m.add_argument("--reps", type=int, default=3, help="timed inference batches per mode")
    m.add_argument("--train-reps", type=int, default=2, help="timed train steps per mode")
    m.add_argument("--no-spread-router", dest="spread_router", action="store_false",
                   help="keep the reference router init (every image routed alike)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    m.add_argument("--out", type=Path, help="also write the JSON here")
