"""The service vs the raw model: Ray Serve over HTTP (one domain, one Scorer replica) at 1/8/32 clients, and the
same batches scored in-process (`python jobs/benchmark.py serve`), with a CPU accountant for where the time went."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from anomalymoe.bench.model import peak_rss_mb
from anomalymoe.models.config import presets
from anomalymoe.models.model import AnomalyMoE

SERVE_LEVELS = (1, 8, 32)
TARGET_EFFICIENCY_C8 = 0.85


def _cpu_snapshot() -> dict:
    """CPU seconds used so far by this process and every process under it (a local Ray cluster's: GCS, raylet,
    Serve's controller, proxy and replicas), by process name; and the whole host's busy CPU seconds. Linux /proc
    only ({} elsewhere)."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal: busy = all but idle, iowait and steal (the hypervisor's)
        host_busy, steal = (v[0] + v[1] + v[2] + v[5] + v[6]) / tick, v[7] / tick
        procs = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read()
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    argv = f.read().decode(errors="replace").replace("\0", " ").split()
            except OSError:
                continue
            rest = st[st.rindex(")") + 2:].split()
            procs[int(d)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / tick, argv)
    except (OSError, ValueError):
        return {}
    ours, frontier = {os.getpid()}, [os.getpid()]
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    while frontier:
        for c in children.get(frontier.pop(), []):
            if c not in ours:
                ours.add(c)
                frontier.append(c)
    by: dict[str, float] = {}
    for pid in ours:
        if pid not in procs:
            continue
        _, cpu, argv = procs[pid]
        if pid == os.getpid():
            name = "driver (benchmark: clients / raw)"
        elif argv and argv[0].startswith("ray::"):
            name = argv[0].split(".")[0]  # the actor, without the method it runs now
        else:
            script = next((a for a in argv[1:] if a.endswith(".py")), None) if argv else None
            name = Path(script or (argv[0] if argv else "?")).name
        by[name] = by.get(name, 0.0) + cpu
    return {"host_busy_s": host_busy, "steal_s": steal, "by_process": by}


def _cpu_delta(a: dict, b: dict, elapsed: float) -> dict:
    """CPU seconds spent between two snapshots: ours by process, the rest of the host ("foreign": other users'
    jobs), and the host's busy share of its cores."""
    if not a or not b:
        return {}
    by = {k: b["by_process"][k] - a["by_process"].get(k, 0.0) for k in b["by_process"]}
    by = {k: round(v, 2) for k, v in sorted(by.items(), key=lambda kv: -kv[1]) if v >= 0.01}
    ours = sum(by.values())
    host = b["host_busy_s"] - a["host_busy_s"]
    return {"ours_s": round(ours, 2), "foreign_s": round(max(0.0, host - ours), 2), "host_busy_s": round(host, 2),
            "host_busy_share": round(host / (elapsed * (os.cpu_count() or 1)), 3),
            "steal_s": round(b["steal_s"] - a["steal_s"], 2), "by_process": by,
            "loadavg_1m_end": round(os.getloadavg()[0], 2)}


def serve_default(field: str):
    from anomalymoe.serve.config import DomainConfig

    return DomainConfig.model_fields[field].default


def _raw_score_batch(loaded, bodies: list[bytes], batch: int, reps: int, warmup: int) -> dict:
    """What one scorer replica runs per batch (anomalymoe.serve.inference.score_batch: PNG decode + forward +
    response shaping), here in this process, on batches of `batch` request bodies."""
    from anomalymoe.serve.inference import score_batch

    def items(k: int) -> list[dict]:
        return [{"data": bodies[(k * batch + i) % len(bodies)], "category": None, "map": False,
                 "enqueued": time.time()} for i in range(batch)]

    with torch.inference_mode():
        for k in range(warmup):
            score_batch(loaded, items(k), "textures")
        times = []
        cpu0, t0 = _cpu_snapshot(), time.perf_counter()
        for k in range(reps):
            its = items(warmup + k)
            t = time.perf_counter()
            out = score_batch(loaded, its, "textures")
            times.append(time.perf_counter() - t)
            if any("error" in o for o in out):
                raise RuntimeError(f"score_batch refused a benchmark image: {out}")
        cpu = _cpu_delta(cpu0, _cpu_snapshot(), time.perf_counter() - t0)
    return {"img_s": batch * reps / sum(times), "batch_s_median": statistics.median(times),
            "batch_s_min": min(times), "batch_s_max": max(times), "reps": reps, "cpu": cpu}


def _http_level(url: str, key: str, bodies: list[bytes], clients: int, per_client: int, warmup: int) -> dict:
    """`clients` threads, each with its own keep-alive session, posting back-to-back (closed loop): `warmup`
    requests each, then all start together and send `per_client` timed requests each."""
    import threading

    import numpy as np
    import requests

    headers = {"Authorization": f"Bearer {key}", "Content-Type": "image/png"}
    barrier = threading.Barrier(clients + 1)
    rows: list[list[tuple]] = [[] for _ in range(clients)]  # (latency s, status, timings_ms | None)
    ends = [0.0] * clients

    def post(s, body):
        t = time.perf_counter()
        try:
            r = s.post(url, data=body, headers=headers, timeout=300)
            status = r.status_code
            tm = r.json().get("timings_ms") if status == 200 else None
        except Exception as e:  # noqa: BLE001 - counted as an error, by kind
            status, tm = type(e).__name__, None
        return time.perf_counter() - t, status, tm

    def client(i: int) -> None:
        with requests.Session() as s:
            try:
                for j in range(warmup):
                    post(s, bodies[(i + j) % len(bodies)])
            finally:
                barrier.wait()
            for j in range(per_client):
                rows[i].append(post(s, bodies[(i + j * clients) % len(bodies)]))
            ends[i] = time.perf_counter()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    cpu0, t0 = _cpu_snapshot(), time.perf_counter()
    for t in threads:
        t.join()
    elapsed = max(ends) - t0
    cpu = _cpu_delta(cpu0, _cpu_snapshot(), time.perf_counter() - t0)
    flat = [r for rs in rows for r in rs]
    ok = [r for r in flat if r[1] == 200]
    errors: dict[str, int] = {}
    for r in flat:
        if r[1] != 200:
            errors[str(r[1])] = errors.get(str(r[1]), 0) + 1
    lat = np.array([r[0] for r in ok]) * 1000 if ok else np.array([float("nan")])
    out = {"clients": clients, "requests": len(flat), "ok": len(ok), "errors": len(flat) - len(ok),
           "error_codes": errors, "elapsed_s": elapsed, "rps": len(ok) / elapsed,
           "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
           "p99_ms": float(np.percentile(lat, 99)), "mean_ms": float(lat.mean()), "max_ms": float(lat.max())}
    tms = [r[2] for r in ok if r[2]]
    if tms:
        bs = [t["batch_size"] for t in tms]
        mean = lambda k: float(statistics.mean(t.get(k, float("nan")) for t in tms))  # noqa: E731
        # a request's share of its batch's compute: its own decode + the batch forward / batch size
        compute_s = sum((t["decode"] + t["model"] / t["batch_size"]) / 1000 for t in tms)
        out.update({
            # per batch (Σ 1/b counts each batch once) and as the requests saw it
            "batch_size_mean": len(bs) / sum(1 / b for b in bs),
            "batch_size_mean_per_request": float(statistics.mean(bs)),
            "batches": round(sum(1 / b for b in bs)),
            "server_ms": {k: mean(k) for k in ("ingress", "queue", "decode", "model", "total")},
            # client latency the service's own timings do not cover: proxy, HTTP, the client threads, Ray calls
            "outside_server_ms": float(statistics.mean(r[0] * 1000 - r[2]["total"] for r in ok if r[2])),
            "replica_busy_share": compute_s / elapsed,  # decode + forward time of the replica / wall time
            "replica_compute_img_s": len(tms) / compute_s,  # img/s while decoding + computing (idle excluded)
        })
    out["cpu"] = cpu
    return out


def bench_serve(args) -> dict:
    """One domain on Ray Serve (one Scorer replica, dynamic batching) driven over HTTP at 1, 8 and 32 concurrent
    clients, against the raw scorer batch function timed in this process with the replica's torch threads."""
    import shutil
    import tempfile

    wall0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="amoe-bench-serve-"))
    old_uri = os.environ.get("MLFLOW_TRACKING_URI")
    (tmp / "db").mkdir()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'db' / 'mlflow.db'}"  # before any registry call
    ray_started = serve_started = False
    try:
        import mlflow
        import ray
        from ray import serve

        from anomalymoe.models.artifact import save_artifact
        from anomalymoe.models.calibration import fit_calibration
        from anomalymoe.platform.cluster.local.proc import free_port
        from anomalymoe.platform.data.demo.textures import generate_textures
        from anomalymoe.platform.data.pipeline import load_rows
        from anomalymoe.platform.data.sources import resolve_data
        from anomalymoe.platform.data.transforms import Framing
        from anomalymoe.platform.tracking import registry
        from anomalymoe.serve import inference
        from anomalymoe.serve.app import deploy, wait_ready
        from anomalymoe.serve.config import Autoscaling, DomainConfig, RateLimit, ServeConfig
        from anomalymoe.serve.tenants import TenantStore

        # ---- data, a calibrated model, registered as champion of anomalymoe-textures
        root = tmp / "textures"
        generate_textures(root, n_train=args.n_train, n_test_good=args.n_test, n_test_defect_per_type=1,
                          image_size=args.image_size, categories=("brick",))
        df, _ = resolve_data([f"textures={root}"])
        torch.manual_seed(args.seed)
        mcfg = presets()[args.preset].model_copy(deep=True)
        model = AnomalyMoE(mcfg).eval()
        train = df[df["split"] == "train"]
        images, masks = load_rows(train, Framing.for_model(mcfg))
        with torch.no_grad():
            fit_calibration(model, [(images, masks, (train["domain"] + "/" + train["category"]).tolist())])
        art = save_artifact(model, tmp / "artifact")
        del model, images, masks
        mlflow.set_tracking_uri(registry.tracking_uri())
        with mlflow.start_run(experiment_id=registry.experiment_id("bench-serve")) as run:
            mlflow.log_artifacts(str(art), artifact_path=registry.ARTIFACT_PATH)
        version = registry.register(run.info.run_id, "textures", {}, alias=registry.CHAMPION)
        bodies = [Path(u).read_bytes() for u in df.sort_values("uri")["uri"]]

        # ---- the serving config: one replica, so the comparison is one replica vs the raw model
        dom = DomainConfig(domain="textures", max_batch_size=args.batch_size,
                           batch_wait_timeout_s=args.batch_wait, max_ongoing_requests=args.max_ongoing,
                           autoscaling=Autoscaling(min_replicas=1, max_replicas=1),
                           scorer_cpus=float(args.threads), torch_threads=args.threads)
        tenants = tmp / "tenants.json"
        key = TenantStore(str(tenants)).add("bench", ["textures"], RateLimit(per_second=10000, burst=10000))
        cfg = ServeConfig(host="127.0.0.1", port=args.port or free_port(), domains=[dom], tenants_uri=str(tenants))
        threads = dom.threads

        if args.address:
            ray.init(address=args.address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(os.cpu_count() or 1, threads), include_dashboard=False, log_to_driver=False)
        ray_started = True

        # ---- raw, before anything is deployed: this process, the replica's thread count
        torch.set_num_threads(threads)
        registry_uri = dom.model_uri
        loaded = inference.load(registry_uri, threads)
        raw_before = _raw_score_batch(loaded, bodies, args.batch_size, args.raw_reps, warmup=2)
        print(f"raw before deploy: {raw_before['img_s']:.2f} img/s", file=sys.stderr, flush=True)
        # smaller batches too: what the replica would reach if its batches do not fill (diagnostic only)
        raw_small = {str(b): _raw_score_batch(loaded, bodies, b, max(2, args.raw_reps * args.batch_size // b // 2),
                                              warmup=1)["img_s"]
                     for b in sorted({1, max(1, args.batch_size // 2)}) if b < args.batch_size}

        # ---- deploy and wait until the model is loaded
        t = time.perf_counter()
        pinned = deploy(cfg)
        serve_started = True
        base = f"http://{cfg.host}:{cfg.port}"
        wait_ready(cfg, timeout=args.ready_timeout)
        ready_s = time.perf_counter() - t
        print(f"deployed and ready in {ready_s:.1f} s", file=sys.stderr, flush=True)

        # ---- HTTP load, one level at a time
        url = f"{base}/v1/textures/score"
        levels = {}
        for c in args.levels:
            levels[str(c)] = _http_level(url, key, bodies, c, args.requests, args.warmup)
            r = levels[str(c)]
            print(f"{c} clients: {r['rps']:.2f} img/s, p50 {r['p50_ms']:.0f} ms, batch "
                  f"{r.get('batch_size_mean', float('nan')):.2f}, errors {r['errors']}", file=sys.stderr, flush=True)

        # ---- raw again, the service deployed but idle
        time.sleep(1.0)
        raw_after = _raw_score_batch(loaded, bodies, args.batch_size, args.raw_reps, warmup=1)
        print(f"raw after load: {raw_after['img_s']:.2f} img/s", file=sys.stderr, flush=True)
    finally:
        if serve_started:
            try:
                serve.shutdown()
            except Exception as e:  # noqa: BLE001 - still shut Ray down and clean up
                print(f"serve.shutdown failed: {e}", file=sys.stderr)
        if ray_started:
            ray.shutdown()
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri
        shutil.rmtree(tmp, ignore_errors=True)

    raw = (raw_before["img_s"] + raw_after["img_s"]) / 2
    res = {
        "benchmark": "serve",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "host_cpus": os.cpu_count(),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "command": "python jobs/benchmark.py " + " ".join(sys.argv[1:]),
        "config": {"preset": args.preset, "backbone": mcfg.backbone.name, "model_input_px": mcfg.backbone.img_size,
                   "image_size": args.image_size, "body_kb_mean": sum(map(len, bodies)) / len(bodies) / 1024,
                   "batch_size": args.batch_size, "batch_wait_timeout_s": dom.batch_wait_timeout_s,
                   "max_ongoing_requests": dom.max_ongoing_requests, "scorer_replicas": 1,
                   "scorer_cpus": dom.scorer_cpus, "torch_threads": threads, "ray_cpus": None if args.address
                   else max(os.cpu_count() or 1, threads), "address": args.address,
                   "requests_per_client": args.requests, "warmup_per_client": args.warmup,
                   "requests_per_level": {str(c): c * args.requests for c in args.levels},
                   "raw_reps": args.raw_reps, "model_version": version, "model_uri": registry_uri,
                   "pinned": pinned.get("textures", {}).get("uri")},
        "raw": {"measures": "inference.score_batch (PNG decode + forward + response shaping), one batch of "
                            f"{args.batch_size}, this process, {threads} torch threads",
                "img_s_before_deploy": raw_before["img_s"], "img_s_after_http": raw_after["img_s"],
                "before": raw_before, "after": raw_after,
                "img_s_by_batch_size_before_deploy": {**raw_small, str(args.batch_size): raw_before["img_s"]}},
        "raw_img_s": raw,
        "concurrency": levels,
        "ready_s": ready_s,
    }
    if "8" in levels:
        res["efficiency_c8"] = levels["8"]["rps"] / raw
        # the raw figure drifts within a run (the idle service's processes, the host): both ends, for honesty
        res["efficiency_c8_vs_raw_before"] = levels["8"]["rps"] / raw_before["img_s"]
        res["efficiency_c8_vs_raw_after"] = levels["8"]["rps"] / raw_after["img_s"]
        res["target_efficiency_c8"] = TARGET_EFFICIENCY_C8
        res["meets_target"] = res["efficiency_c8"] >= TARGET_EFFICIENCY_C8
    # other users' jobs on this host during a timed phase: over 10 % of its CPU makes the figures unreliable
    phases = {"raw_before": raw_before.get("cpu"), "raw_after": raw_after.get("cpu"),
              **{f"c{k}": v.get("cpu") for k, v in levels.items()}}
    foreign = {k: round(v["foreign_s"] / (v["host_busy_s"] / v["host_busy_share"]), 3)
               for k, v in phases.items() if v and v.get("host_busy_share")}
    res["foreign_cpu_share"] = foreign
    res["noisy_phases"] = sorted(k for k, v in foreign.items() if v > 0.10)
    res["peak_rss_mb"] = peak_rss_mb()
    res["wall_s"] = time.perf_counter() - wall0
    return res


def serve_table(res: dict) -> str:
    c = res["config"]
    raw = res["raw"]
    lines = [
        f"Ray Serve, {c['preset']} ({c['backbone']} @ {c['model_input_px']} px), {c['image_size']} px PNG bodies, "
        f"1 Scorer replica ({c['scorer_cpus']:g} CPUs, {c['torch_threads']} torch threads), max batch "
        f"{c['batch_size']}, batch wait {1000 * c['batch_wait_timeout_s']:.0f} ms, host {res['host_cpus']} CPUs, "
        f"{c['requests_per_client']} requests per client (closed loop)",
        f"raw = score_batch (decode + forward, batch {c['batch_size']}, {c['torch_threads']} threads, in-process): "
        f"{res['raw_img_s']:.2f} img/s (before deploy {raw['img_s_before_deploy']:.2f}, "
        f"after the HTTP runs {raw['img_s_after_http']:.2f})",
        "| clients | requests | errors | img/s | p50 ms | p95 ms | p99 ms | mean batch | replica busy | "
        "replica compute img/s | queue ms | model ms/batch | outside server ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    nan = float("nan")
    for k, r in res["concurrency"].items():
        sm = r.get("server_ms", {})
        lines.append(f"| {k} | {r['requests']} | {r['errors']} | {r['rps']:.2f} | {r['p50_ms']:.0f} | "
                     f"{r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r.get('batch_size_mean', nan):.2f} | "
                     f"{100 * r.get('replica_busy_share', nan):.0f} % | {r.get('replica_compute_img_s', nan):.2f} | "
                     f"{sm.get('queue', nan):.0f} | {sm.get('model', nan):.0f} | "
                     f"{r.get('outside_server_ms', nan):.0f} |")
    for k, r in res["concurrency"].items():
        cpu = r.get("cpu")
        if cpu:
            top = ", ".join(f"{n.removeprefix('ray::')} {v:.1f}" for n, v in list(cpu["by_process"].items())[:6])
            lines.append(f"CPU s at {k} clients over {r['elapsed_s']:.1f} s: {top}; other users' jobs "
                         f"{cpu['foreign_s']:.1f}; host busy {100 * cpu['host_busy_share']:.0f} %, steal "
                         f"{cpu['steal_s']:.1f}")
    for when in ("before", "after"):
        cpu = raw[when].get("cpu")
        if cpu:
            lines.append(f"CPU during raw ({when}): ours {cpu['ours_s']:.1f} s, other users' jobs "
                         f"{cpu['foreign_s']:.1f} s, host busy {100 * cpu['host_busy_share']:.0f} %")
    if raw.get("img_s_by_batch_size_before_deploy"):
        lines.append("raw img/s by batch size (before deploy): " + ", ".join(
            f"{b}: {v:.2f}" for b, v in raw["img_s_by_batch_size_before_deploy"].items()))
    if res.get("noisy_phases"):
        lines.append(f"WARNING: other users' jobs took over 10 % of the host's CPU during {res['noisy_phases']}: "
                     "those figures are unreliable")
    if "efficiency_c8" in res:
        lines.append(f"efficiency at 8 clients (served img/s / raw img/s, the mean of before and after): "
                     f"{res['efficiency_c8']:.2f} (target >= {res['target_efficiency_c8']}: "
                     f"{'met' if res['meets_target'] else 'NOT met'}); against raw before deploy only "
                     f"{res['efficiency_c8_vs_raw_before']:.2f}, after only {res['efficiency_c8_vs_raw_after']:.2f}")
    return "\n".join(lines)
