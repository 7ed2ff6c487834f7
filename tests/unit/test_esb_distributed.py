"""ESB statistics are averaged over ranks (2 real gloo processes), and the load term keeps its gradient."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from anomalymoe.models.losses import esb_loss

pytestmark = pytest.mark.unit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, logits_all: torch.Tensor, masks_all: torch.Tensor, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        logits = logits_all[rank].clone().requires_grad_(True)
        res = esb_loss(logits, masks_all[rank], 1.0, 1.0, 0.0)
        res["esb"].backward()
        out[rank] = (float(res["esb_load"]), float(res["esb_importance"]), float(logits.grad.abs().sum()))
    finally:
        dist.destroy_process_group()


def test_esb_statistics_are_global_across_ranks():
    torch.manual_seed(0)
    world, b, e = 2, 4, 6
    logits = torch.randn(world, b, e)
    # rank 0 routes everything to expert 0, rank 1 to expert 1: per rank very unbalanced, globally less so
    masks = torch.zeros(world, b, e, dtype=torch.bool)
    masks[0, :, 0] = True
    masks[1, :, 1] = True
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(world, _free_port(), logits, masks, out), nprocs=world, join=True)

    flat_logits, flat_masks = logits.reshape(-1, e), masks.reshape(-1, e)
    expected = esb_loss(flat_logits, flat_masks, 1.0, 1.0, 0.0)  # one process seeing the global batch
    for rank in range(world):
        load, importance, grad = out[rank]
        assert load == pytest.approx(float(expected["esb_load"]), rel=1e-5)
        assert importance == pytest.approx(float(expected["esb_importance"]), rel=1e-5)
        assert grad > 0
    per_rank = esb_loss(logits[0], masks[0], 1.0, 1.0, 0.0)
    assert abs(float(per_rank["esb_load"]) - float(expected["esb_load"])) > 1e-3  # the all-reduce mattered


def _grad_worker(rank: int, world: int, port: int, out) -> None:
    from anomalymoe.platform.train.distributed import average_gradients, mean_over_ranks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shared, only0, nobody = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
        shared.grad = torch.full((3,), float(rank + 1))  # 1 on rank 0, 2 on rank 1
        if rank == 0:
            only0.grad = torch.full((3,), 4.0)  # an expert routed to on rank 0 only
        average_gradients([shared, only0, nobody], bucket_elements=4)  # several buckets
        means = mean_over_ranks({"loss": float(rank), "lr": 0.5}, "cpu")  # the logged metrics of a step
        out[rank] = (shared.grad.tolist(), only0.grad.tolist(), nobody.grad, means)
    finally:
        dist.destroy_process_group()


def test_gradients_are_averaged_for_sparse_experts():
    """Mean over ranks; a rank without a gradient contributes zeros; a parameter nobody used keeps None.
    The collectives run on the parameters' device (gloo here; NCCL with --gpu, checked by infra/gpu/check.sh)."""
    out = mp.Manager().dict()
    mp.spawn(_grad_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    for rank in range(2):
        shared, only0, nobody, means = out[rank]
        assert means == {"loss": 0.5, "lr": 0.5}  # mean_over_ranks: one all-reduce of every logged value
        assert shared == [1.5, 1.5, 1.5]
        assert only0 == [2.0, 2.0, 2.0]  # (4 + 0) / 2: the global-batch mean of a per-sample-summed loss
        assert nobody is None  # the optimiser skips it, as in single-process training


def _step_worker(rank: int, world: int, port: int, out) -> None:
    import dataclasses

    from anomalymoe.models.config import presets
    from anomalymoe.models.model import AnomalyMoE
    from anomalymoe.platform.train.distributed import average_gradients
    from anomalymoe.platform.train.trainer import TrainConfig, Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = AnomalyMoE(presets()["test-tiny"])
        if rank == 1:  # this rank's batch yields no expert pair for the EIR estimator
            forward = model.forward
            model.forward = lambda *a, **k: dataclasses.replace(forward(*a, **k), eir_pairs=[])
        before = [p.detach().clone() for p in model.mi_estimator.parameters()]
        trainer = Trainer(model, TrainConfig(steps=3, batch_size=2, warmup_steps=1), grad_sync=average_gradients)
        images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(rank))
        recs = [trainer.step(images) for _ in range(2)]
        after = [p.detach() for p in model.mi_estimator.parameters()]
        out[rank] = (torch.cat([a.flatten() for a in after]), max((a - b).abs().max().item()
                                                                  for a, b in zip(after, before, strict=True)),
                     [r["estimator_nll"] for r in recs])
    finally:
        dist.destroy_process_group()


def test_train_step_when_one_rank_has_no_estimator_pairs():
    """Both ranks join the estimator's gradient average even when one had no pair (a regression: the ranks ended
    up in different collectives and gloo aborted); the estimators stay identical and still learn."""
    out = mp.Manager().dict()
    mp.spawn(_step_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    w0, moved0, nll0 = out[0]
    w1, moved1, nll1 = out[1]
    assert torch.equal(w0, w1)
    assert moved0 > 0 and moved1 > 0  # rank 1 stepped with rank 0's averaged gradient
    assert all(v != 0 for v in nll0) and all(v == 0 for v in nll1)
