"""Input pipeline from manifests: which rows an epoch sees (balanced, seeded), and decoding them, either
in-process or streamed through Ray Data (reads from S3 or local paths through `storage`).

Balance: the reference concatenates 46 classes of very different sizes and never reshuffles per epoch
(METHOD.md §5 #15). Here every epoch draws a fixed number of rows with category probabilities
proportional to n_c ** alpha (alpha = 0: categories equally likely; 1: proportional to size), from a
generator seeded by (seed, epoch): the same epoch is the same list of rows on every machine and rank."""

from __future__ import annotations

import queue
import threading
import zlib
from collections.abc import Iterator
from typing import TypeVar

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from anomalymoe.models.parts import component_masks
from anomalymoe.platform.data import storage
from anomalymoe.platform.data.transforms import (
    Frame,
    Framing,
    decode_label_map,
    decode_pool,
    decode_sized,
    to_tensor,
)

TRAIN_COLUMNS = ("uri", "domain", "category", "component_mask_uri")


def epoch_indices(df: pd.DataFrame, epoch: int, *, seed: int = 0, alpha: float = 0.0, size: int | None = None,
                  group_by: tuple[str, ...] = ("domain", "category")) -> np.ndarray:
    """Row positions of one epoch: `size` draws (default len(df)), category-balanced, seeded by (seed, epoch).
    Within a category rows are drawn without replacement as long as possible (a reshuffled cycle)."""
    if df.empty:
        raise ValueError("cannot sample from an empty manifest")
    rng = np.random.default_rng([seed, epoch])
    groups = [np.asarray(idx) for _, idx in sorted(df.groupby(list(group_by)).indices.items())]
    sizes = np.array([len(g) for g in groups], dtype=np.float64)
    probs = sizes**alpha
    probs /= probs.sum()
    size = len(df) if size is None else size
    counts = rng.multinomial(size, probs)
    picks = []
    for g, n in zip(groups, counts, strict=True):
        reps = int(np.ceil(n / len(g))) if n else 0
        cycle = np.concatenate([rng.permutation(g) for _ in range(reps)]) if reps else np.empty(0, dtype=np.int64)
        picks.append(cycle[:n])
    out = np.concatenate(picks)
    return out[rng.permutation(len(out))]


def holdout_split(df: pd.DataFrame, fraction: float, seed: int = 0,
                  group_by: tuple[str, ...] = ("domain", "category")) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out a seeded share of each category's rows (at least one where the category has two or more)."""
    train, held = [], []
    for key, sub in sorted(df.groupby(list(group_by)), key=lambda kv: kv[0]):
        sub = sub.sort_values("uri")
        n_held = max(1, round(len(sub) * fraction)) if len(sub) > 1 and fraction > 0 else 0
        perm = np.random.default_rng([seed, zlib.crc32("/".join(map(str, key)).encode())]).permutation(len(sub))
        held.append(sub.iloc[np.sort(perm[:n_held])])
        train.append(sub.iloc[np.sort(perm[n_held:])])
    return pd.concat(train), pd.concat(held)


def per_category_sample(df: pd.DataFrame, max_rows: int, seed: int = 0) -> pd.DataFrame:
    """At most `max_rows` seeded rows of each (domain, category), in uri order (the part bank's training images)."""
    out = []
    for key, sub in sorted(df.groupby(["domain", "category"]), key=lambda kv: kv[0]):
        sub = sub.sort_values("uri")
        if len(sub) > max_rows:
            perm = np.random.default_rng([seed, zlib.crc32("/".join(map(str, key)).encode())]).permutation(len(sub))
            sub = sub.iloc[np.sort(perm[:max_rows])]
        out.append(sub)
    return pd.concat(out) if out else df.iloc[:0]


def _row_key(r) -> str | None:
    """The "domain/category" of a manifest row (an itertuples row); None for rows without a domain."""
    return f"{r.domain}/{r.category}" if hasattr(r, "domain") else None


def decode_row(r, framing: Frame | Framing, with_labels: bool = True
               ) -> tuple[np.ndarray, tuple[int, int], np.ndarray | None]:
    """One manifest row through its category's frame: the uint8 image, the image's own (width, height), and, when
    asked for and the row has one, its component label map through the same frame (else None). What both the
    in-process loader and the Ray Data decode tasks do per row."""
    geometry = framing.for_key(_row_key(r))
    rgb, size = decode_sized(storage.read_bytes(r.uri), geometry)
    cm = getattr(r, "component_mask_uri", None)
    has = with_labels and isinstance(cm, str) and bool(cm)
    return rgb, size, decode_label_map(storage.read_bytes(cm), geometry, size) if has else None


def load_rows(rows: pd.DataFrame, frame: int | Frame | Framing, kept: dict[str, list[int]] | None = None,
              threads: int = 0, sizes: list[tuple[int, int]] | None = None) -> tuple[Tensor, list[Tensor | None]]:
    """Decode a batch of manifest rows: images and, where the row has a component label map and its
    category a kept-cluster list, the component masks. `frame`: the model's input geometry (a Framing picks each
    row's by its category; an int = a plain resize to that size). threads > 1 decodes the rows in a shared thread
    pool (Pillow releases the GIL while it decodes and resizes), in row order: the same batch as one thread gives.
    `sizes`, when given, is extended with each image's own (width, height)."""
    framing = Frame.of(frame)

    def one(r) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
        key = _row_key(r)
        rgb, size, labels = decode_row(r, framing, with_labels=key in (kept or {}))
        return to_tensor(rgb), None if labels is None else component_masks(labels, kept[key]), size

    items = list(rows.itertuples(index=False))
    decoded = list(decode_pool(threads).map(one, items)) if threads > 1 and len(items) > 1 else map(one, items)
    images, masks, own = zip(*decoded, strict=True) if items else ((), (), ())
    if sizes is not None:
        sizes.extend(own)
    return torch.stack(list(images)), list(masks)


T = TypeVar("T")
_END = object()


def prefetch(it: Iterator[T], depth: int = 2, pin: bool = False) -> Iterator[T]:
    """Produce `it` in a background thread, up to `depth` items ahead, so decoding overlaps the training step.
    pin: page-lock (images, masks) batches, so a `.to(cuda, non_blocking=True)` copy overlaps compute too.
    An error in the producer is raised here, at the item where it happened."""
    if depth <= 0:
        yield from it
        return
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for x in it:
                if pin and isinstance(x, tuple) and x and isinstance(x[0], Tensor):
                    x = (x[0].pin_memory(), *x[1:])
                while not stop.is_set():
                    try:
                        q.put(x, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    t = threading.Thread(target=produce, name="prefetch", daemon=True)
    t.start()
    try:
        while True:
            x = q.get()
            if x is _END:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()


def to_device(batch: tuple, device: str | torch.device) -> tuple:
    """(images, masks, ...) with the images and every component mask on `device` (non-blocking from pinned
    memory); the rest of the tuple (e.g. category keys) as it is."""
    images, masks, *rest = batch
    masks = masks and [m.to(device, non_blocking=True) if m is not None else None for m in masks]
    return (images.to(device, non_blocking=True), masks, *rest)


def row_keys(rows: pd.DataFrame) -> list[str]:
    """The "domain/category" key of each row (two domains may share a category name)."""
    return (rows["domain"].astype(str) + "/" + rows["category"].astype(str)).tolist()


def category_batches(rows: pd.DataFrame, frame: int | Frame | Framing, kept: dict[str, list[int]] | None,
                     batch_size: int = 8) -> Iterator[tuple[Tensor, list[Tensor | None], list[str]]]:
    """(images, masks, "domain/category" keys) in row order: what calibration and validation consume (keyed by
    domain too, since two domains may share a category name)."""
    for start in range(0, len(rows), batch_size):
        chunk = rows.iloc[start : start + batch_size]
        images, masks = load_rows(chunk, frame, kept)
        yield images, masks, row_keys(chunk)


def local_epochs(df: pd.DataFrame, frame: int | Frame | Framing, batch_size: int, *, seed: int = 0, alpha: float = 0.0,
                 kept: dict[str, list[int]] | None = None, epoch_size: int | None = None, threads: int = 0,
                 depth: int = 0, pin: bool = False
                 ) -> Iterator[Iterator[tuple[Tensor, list[Tensor | None], list[str]]]]:
    """In-process pipeline: one iterator of (images, masks, "domain/category" keys) batches per epoch, forever
    (masks from stored label maps where `kept` names the row's category, else None: the model derives them).
    threads: decode threads per batch; depth: batches decoded ahead in the background (0: decode on demand, in
    the caller's thread). One PNG at a time in the training process kept an H200 waiting (issue 12: < 107 img/s
    end to end)."""
    epoch = 0
    while True:
        idx = epoch_indices(df, epoch, seed=seed, alpha=alpha, size=epoch_size)

        def one_epoch(idx=idx):
            for start in range(0, len(idx) - batch_size + 1, batch_size):
                rows = df.iloc[idx[start : start + batch_size]]
                yield (*load_rows(rows, frame, kept, threads=threads), row_keys(rows))

        yield prefetch(one_epoch(), depth, pin)
        epoch += 1


def step_rows(df: pd.DataFrame, step: int, global_batch: int, *, seed: int = 0, alpha: float = 0.0,
              rank: int = 0, world: int = 1, stop: int | None = None) -> pd.DataFrame:
    """The rows of training steps [step, stop) (default: one step) for one rank, in step order. The global row
    stream is a sequence of seeded, balanced epochs of `global_batch * floor(len(df) / global_batch)` rows (at
    least one batch); step s is the s-th batch of it, and rank r of `world` takes the r-th equal slice. So the
    stream depends only on (data, seed, alpha, global batch): 1 worker or 2 see the same images per step, and
    a resumed run picks up exactly where the checkpoint was written."""
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} is not divisible by {world} workers")
    stop = step + 1 if stop is None else stop
    per_epoch = max(1, len(df) // global_batch)
    local = global_batch // world
    picks, epoch_idx = [], {}
    for s in range(step, stop):
        epoch, pos = divmod(s, per_epoch)
        if epoch not in epoch_idx:
            epoch_idx.clear()
            epoch_idx[epoch] = epoch_indices(df, epoch, seed=seed, alpha=alpha, size=per_epoch * global_batch)
        lo = pos * global_batch + rank * local
        picks.append(epoch_idx[epoch][lo : lo + local])
    return df.iloc[np.concatenate(picks) if picks else np.empty(0, np.int64)]


def ray_rows(rows: pd.DataFrame, frame: int | Frame | Framing, *, read_concurrency: int = 2, block_rows: int = 16,
             num_cpus: float = 1.0):
    """Rows as a Ray Dataset, decoded in parallel tasks in row order: each row gains `image` (uint8 HWC at the
    frame) and `labels` (the component label map through the same frame, uint8 HW; all zeros and
    `has_labels` False where the row has none). uint8 keeps object-store traffic small; `to_batch` makes
    model input. Reads stream from S3 or disk through `storage`. `num_cpus` per decode task: 0 inside Ray
    Train workers, which already hold the CPUs they run on."""
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # the seeded order is the point
    framing = Frame.of(frame)
    cols = [c for c in (*TRAIN_COLUMNS, "label", "defect", "mask_uri") if c in rows.columns]
    rows = rows[cols].reset_index(drop=True)
    rows["order"] = np.arange(len(rows))

    def decode(batch: pd.DataFrame) -> pd.DataFrame:
        imgs, labs, has, widths, heights = [], [], [], [], []
        for r in batch.itertuples(index=False):
            rgb, (w, h), labels = decode_row(r, framing)
            imgs.append(rgb)
            widths.append(w)
            heights.append(h)
            has.append(labels is not None)
            labs.append(labels if labels is not None else np.zeros((framing.size,) * 2, np.uint8))
        out = batch.copy()
        out["image"], out["labels"], out["has_labels"] = imgs, labs, has
        out["width"], out["height"] = widths, heights
        return out

    blocks = [rows.iloc[i : i + block_rows] for i in range(0, len(rows), block_rows)]  # one block per decode task
    # from_blocks, not from_pandas: from_pandas runs remote metadata tasks that need a free CPU, and inside a
    # Ray Train worker group that holds every CPU they never start (measured: a silent hang)
    return ray.data.from_blocks(blocks).map_batches(decode, batch_format="pandas", batch_size=block_rows,
                                                    compute=ray.data.TaskPoolStrategy(size=read_concurrency),
                                                    num_cpus=num_cpus)


def ray_epoch(df: pd.DataFrame, epoch: int, frame: int | Frame | Framing, *, seed: int = 0, alpha: float = 0.0,
              epoch_size: int | None = None, read_concurrency: int = 2):
    """One seeded, balanced epoch (`epoch_indices`) as a Ray Dataset of decoded rows (see `ray_rows`)."""
    idx = epoch_indices(df, epoch, seed=seed, alpha=alpha, size=epoch_size)
    return ray_rows(df.iloc[idx], frame, read_concurrency=read_concurrency)


def to_batch(batch: dict | pd.DataFrame, kept: dict[str, list[int]] | None = None
             ) -> tuple[Tensor, list[Tensor | None]]:
    """A decoded Ray batch -> (images [B,3,H,W] float in [0,1], component masks per row) as `load_rows` gives."""
    imgs = np.stack(list(batch["image"]))
    # the same arithmetic as to_tensor (numpy float32 / 255.0), so both paths give bit-identical input
    images = torch.from_numpy(np.asarray(imgs, dtype=np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
    masks: list[Tensor | None] = []
    has = list(batch["has_labels"]) if "has_labels" in batch else [False] * len(imgs)
    doms, cats = list(batch["domain"]), list(batch["category"])
    labels = list(batch["labels"]) if "labels" in batch else []
    for i, h in enumerate(has):
        key = f"{doms[i]}/{cats[i]}" if h and kept else None
        masks.append(component_masks(np.asarray(labels[i]), kept[key]) if key in (kept or {}) else None)
    return images, masks
