"""torch.distributed with two CPU processes (gloo): sharded fitting and DDP training."""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lalora_curv as lc
from helpers import make_batches, make_model, one_thread

#: every test spawns WORLD fresh processes (each imports torch, transformers and peft)
pytestmark = pytest.mark.slow
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str, job: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),  # a hang fails the test instead of stalling CI
    )
    try:
        torch.set_num_threads(1)
        if job == "fit":
            model = make_model()
            batches = make_batches(4, seed=3)[rank::WORLD]  # each rank its shard
            for structure in ("kfac", "diag", "ekfac"):
                prec = lc.fit_precision(
                    model, batches, structure=structure, progress=False, stats_dtype=torch.float64
                )
                lc.save_precision(prec, Path(out) / f"{structure}-rank{rank}")
        elif job == "nan":  # rank 1 alone produces a NaN loss: both ranks must stop
            from torch.nn.parallel import DistributedDataParallel

            model = make_model(dtype=torch.float32, init_B_std=0.0)
            if rank == 1:
                model.base_model.model.lm_head.register_forward_hook(
                    lambda m, a, out: out * float("nan")
                )
            try:
                lc.train(
                    DistributedDataParallel(model),
                    make_batches(2, seed=2),
                    None,
                    0.0,
                    max_steps=2,
                    progress=False,
                )
            except lc.TrainingError as e:
                (Path(out) / f"error-rank{rank}.txt").write_text(str(e))
        elif job == "fsdp":
            _fsdp_job(rank, Path(out))
        else:
            from torch.nn.parallel import DistributedDataParallel

            model = make_model(dtype=torch.float32, init_B_std=0.0)
            prec = lc.fit_precision(
                model, make_batches(2, seed=1), structure="kfac", progress=False
            )
            # two micro-batches per step and rank (the no_sync path); rank 0 holds one batch
            # more than rank 1, so the ranks must agree on the step count
            target = make_batches(9, seed=2)[rank::WORLD]
            ddp = DistributedDataParallel(model)
            records = lc.train(
                ddp, target, prec, 5.0, lr=1e-2, grad_accum_steps=2, progress=False, seed=0
            )
            torch.save(
                {
                    "records": records,
                    "adapter": {
                        n: p.detach() for n, p in model.named_parameters() if p.requires_grad
                    },
                },
                Path(out) / f"train-rank{rank}.pt",
            )
    finally:
        dist.destroy_process_group()


def displaced(seed: int = 5, scale: float = 0.1):
    """The float64 test model (B0 != 0) with its adapter moved away from the init, and the
    precisions' mode (the init)."""
    from lalora_curv.adapter import adapter_mode, find_lora_modules

    model = make_model()
    mode = adapter_mode(find_lora_modules(model), torch.float64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model, mode


def full_params(model) -> dict[str, torch.Tensor]:
    from lalora_curv.adapter import whole

    return {n: whole(p.detach()).clone() for n, p in model.named_parameters() if p.requires_grad}


def full_grads(model) -> dict[str, torch.Tensor]:
    from lalora_curv.adapter import whole

    return {n: whole(p.grad).clone() for n, p in model.named_parameters() if p.requires_grad}


def shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _fsdp_job(rank: int, out: Path) -> None:
    """Under FSDP2 (every layer and the root sharded over 2 ranks): fit on this rank's shard
    of the batches, the penalty and its gradient at a displaced adapter, one training step."""
    from torch.distributed.tensor import DTensor

    batches = make_batches(4, seed=3)[rank::WORLD]
    model = shard(make_model())
    assert all(isinstance(p, DTensor) for n, p in model.named_parameters() if "lora_" in n)
    fitted = {}
    for structure in ("kfac", "diag", "tri-kfac"):
        fitted[structure] = lc.fit_precision(
            model, batches, structure=structure, progress=False, stats_dtype=torch.float64
        )
        if rank == 0:
            lc.save_precision(fitted[structure], out / f"fsdp-{structure}")
    reference = lc.load_precision(out / "single-tri-kfac")  # one process's, by the test
    moved, _ = displaced()
    moved = shard(moved)
    penalty = reference.penalty(moved)
    penalty.backward()
    result = {"penalty": penalty.detach(), "grads": full_grads(moved)}
    trained, _ = displaced()
    trained = shard(trained)
    records = lc.train(
        trained, batches[:1], reference, 3.0, lr=1e-2, max_steps=1, progress=False, seed=0
    )
    result |= {"records": records, "adapter": full_params(trained)}
    try:  # checkpoints of a sharded run are refused, by name
        lc.train(trained, batches[:1], reference, 3.0, max_steps=1, checkpoint_dir=out / "c",
                 progress=False)  # fmt: skip
    except lc.TrainingError as e:
        result["checkpoint_error"] = str(e)
    torch.save(result, out / f"fsdp-rank{rank}.pt")


def spawn(tmp_path: Path, job: str) -> None:
    mp.start_processes(
        _worker,
        args=(free_port(), str(tmp_path), job),
        nprocs=WORLD,
        start_method="spawn",
        join=True,
    )


def test_sharded_fit_equals_single_process_fit(tmp_path):
    spawn(tmp_path, "fit")
    model = make_model()
    batches = make_batches(4, seed=3)
    with one_thread():
        singles = {
            s: lc.fit_precision(
                model, batches, structure=s, progress=False, stats_dtype=torch.float64
            )
            for s in ("kfac", "diag", "ekfac")
        }
    for structure, single in singles.items():
        ranks = [lc.load_precision(tmp_path / f"{structure}-rank{r}") for r in range(WORLD)]
        for prec in ranks:
            assert prec.counts == single.counts
            for key, t in single.structure_tensors().items():
                torch.testing.assert_close(
                    prec.structure_tensors()[key],
                    t,
                    rtol=1e-9,
                    atol=1e-12,
                    msg=f"{structure} {key}",
                )


def test_ddp_training_matches_single_process_accumulation(tmp_path):
    """Two ranks with two micro-batches each per step (no_sync, then a synced backward) == one
    process accumulating all four: DDP averages the NLL gradients, and the penalty (the same on
    both ranks) enters once. Unequal shards: both ranks stop at the shorter one's steps."""
    spawn(tmp_path, "train")
    runs = [torch.load(tmp_path / f"train-rank{r}.pt") for r in range(WORLD)]
    assert [r["penalty"] for r in runs[0]["records"]] == [r["penalty"] for r in runs[1]["records"]]
    for n, p in runs[0]["adapter"].items():
        assert torch.equal(p, runs[1]["adapter"][n])  # replicas stay identical

    model = make_model(dtype=torch.float32, init_B_std=0.0)
    prec = lc.fit_precision(model, make_batches(2, seed=1), structure="kfac", progress=False)
    target = make_batches(9, seed=2)
    shards = [target[0::2], target[1::2]]  # 5 and 4 batches: 2 steps on every rank
    assert len(runs[0]["records"]) == len(runs[1]["records"]) == 2
    single = [b for step in range(2) for shard in shards for b in shard[2 * step : 2 * step + 2]]
    records = lc.train(
        model, single, prec, 5.0, lr=1e-2, max_steps=2, grad_accum_steps=4, progress=False, seed=0
    )
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(runs[0]["adapter"][n], p.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        torch.tensor([r["penalty"] for r in records]),
        torch.tensor([r["penalty"] for r in runs[0]["records"]]),
        rtol=1e-4,
        atol=1e-8,
    )


def test_a_nan_on_one_rank_stops_every_rank(tmp_path):
    spawn(tmp_path, "nan")
    errors = [(tmp_path / f"error-rank{r}.txt").read_text() for r in range(WORLD)]
    assert "step 1: the target NLL of batch 0 is nan" in errors[1]
    # rank 0 sees it as the all-reduced NaN gradient, or through the failure flag
    assert "nothing was updated" in errors[0]


def test_fsdp2_fit_penalty_gradient_and_step_equal_one_process(tmp_path):
    """FSDP2 (fully_shard) over two gloo ranks: the precision fitted on the two shards of the
    data, the penalty and its gradient on the sharded adapter, and one training step (each
    rank a micro-batch) equal one process to float64 round-off."""
    model = make_model()
    batches = make_batches(4, seed=3)
    with one_thread():
        single = {
            s: lc.fit_precision(
                model, batches, structure=s, progress=False, stats_dtype=torch.float64
            )
            for s in ("kfac", "diag", "tri-kfac")
        }
    lc.save_precision(single["tri-kfac"], tmp_path / "single-tri-kfac")
    spawn(tmp_path, "fsdp")
    for structure, prec in single.items():
        got = lc.load_precision(tmp_path / f"fsdp-{structure}")
        assert got.counts == prec.counts
        for key, t in prec.structure_tensors().items():
            torch.testing.assert_close(got.structure_tensors()[key], t, rtol=1e-10, atol=1e-13)
        for key, t in prec.mode.items():
            assert torch.equal(got.mode[key], t)  # the mode is the adapter's whole tensors
    runs = [torch.load(tmp_path / f"fsdp-rank{r}.pt") for r in range(WORLD)]
    assert all("FSDP-sharded run" in run["checkpoint_error"] for run in runs)
    moved, _ = displaced()
    penalty = single["tri-kfac"].penalty(moved)
    penalty.backward()
    grads = {n: p.grad for n, p in moved.named_parameters() if p.requires_grad}
    for run in runs:
        torch.testing.assert_close(run["penalty"], penalty.detach(), rtol=1e-12, atol=0)
        assert set(run["grads"]) == set(grads)
        for n, g in grads.items():
            torch.testing.assert_close(run["grads"][n], g, rtol=1e-10, atol=1e-14, msg=n)
    # one step of the two ranks (a micro-batch each) == one process accumulating both
    trained, _ = displaced()
    first = [make_batches(4, seed=3)[r::WORLD][0] for r in range(WORLD)]
    records = lc.train(
        trained, first, single["tri-kfac"], 3.0, lr=1e-2, max_steps=1, grad_accum_steps=2,
        progress=False, seed=0,
    )  # fmt: skip
    for run in runs:
        assert run["records"][0]["penalty"] == pytest.approx(records[0]["penalty"], rel=1e-10)
        for n, p in trained.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(run["adapter"][n], p.detach(), rtol=1e-9, atol=1e-12)
