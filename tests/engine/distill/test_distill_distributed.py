"""`engine distill` across processes: 2 ranks on the CPU (gloo, torchrun's environment variables set by
hand in processes started with torch.multiprocessing) against the single-process run.

One group of two processes runs every scenario in turn (starting processes is the expensive part):
one distributed step's loss and image gradients vs one process (kept graph and chunked re-runs, an
uneven split of the copies), an 8-step distill (same losses and images; only rank 0 writes), Ctrl-C on
one rank (both stop at the same step, rank 0 saves; resuming gives the uninterrupted run bit for bit),
a non-finite loss seen by one rank only (both stop), and a setup error on one rank (both stop,
nothing written)."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

BACKBONE = "test-cnn"
PER_CLASS = 4
WORLD = 2
TIMEOUT_S = 120

# The step compared directly: 3 classes x 1 image x 3 augmentations = 9 copies, split 5 / 4.
GRAD_CLASSES, GRAD_AUGS = 3, 3


@pytest.fixture(scope="module")
def store(make_gratings_store) -> Path:
    return make_gratings_store(BACKBONE, splits=["train"], limit_per_class=PER_CLASS, dtype="fp32", views=2)


def _config(store: Path, out: Path, **kw):
    from engine.distill import DistillConfig

    base = dict(store=str(store), backbone=BACKBONE, out=str(out), ipc=1, steps=8, augs=2, grow_every=1,
                checkpoint_every=10, quiet=True, device="cpu")
    base.update(kw)
    return DistillConfig(**base)


def _gradient_step(chunk: int, distributed: bool, rank: int = 0, world: int = 1):
    """(loss, parameter gradients) of one LGM step on a fixed pyramid (after the all-reduce if distributed)."""
    from engine.distill import SyntheticSide
    from engine.distributed import reduce_step
    from engine.objectives import LGMObjective
    from engine.parameterizations import PyramidImages
    from featurestore.augment import AugmentConfig
    from featurestore.backbones import create_backbone

    backbone = create_backbone(BACKBONE)
    syn = PyramidImages(GRAD_CLASSES, 1, backbone.resize_size, init="noise", grow_every=1,
                        generator=torch.Generator().manual_seed(0))
    for s in range(4):
        syn.grow(s)
    forward = SyntheticSide(backbone, GRAD_AUGS, True, AugmentConfig())
    plan = forward.draw(syn.n, torch.Generator().manual_seed(5))
    real = torch.randn(40, backbone.dim, generator=torch.Generator().manual_seed(1))
    real_y = torch.arange(40) % GRAD_CLASSES
    obj = LGMObjective(GRAD_CLASSES, head_std=0.1)

    def loss_fn(f, y):
        return obj.loss(f, y, real, real_y, torch.Generator().manual_seed(9))

    if distributed:
        loss = forward.loss_and_backward(syn, plan, chunk, loss_fn, rank, world)
        assert reduce_step(syn.parameters(), stop=False, nonfinite=False) == (False, False)
    else:
        loss = forward.loss_and_backward(syn, plan, chunk, loss_fn)
    return loss, [p.grad.clone() for p in syn.parameters()]


def _count_writes(monkeypatch_targets, counts: dict[str, int]) -> None:
    """Wrap every writer the engine.distill modules call so the rank's writes are counted."""
    names = ["atomic_write_stream", "atomic_write_json", "append_metric", "write_metrics", "write_imagefolder",
             "save_safetensors", "save_grid", "save_loss_plot"]
    for name in names:
        monkeypatch_target = next(t for t in monkeypatch_targets if hasattr(t, name))
        original = getattr(monkeypatch_target, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)

        setattr(monkeypatch_target, name, wrapped)


def _patch_loss(rank_hook):
    """Make LGMObjective.loss call rank_hook(call_number, loss) and return its result."""
    import engine.objectives as objectives

    original = objectives.LGMObjective.loss
    calls = {"n": 0}

    def patched(self, *args, **kwargs):
        calls["n"] += 1
        return rank_hook(calls["n"], original(self, *args, **kwargs))

    objectives.LGMObjective.loss = patched
    return lambda: setattr(objectives.LGMObjective, "loss", original)


def _outcome(fn):
    try:
        return {"ok": fn()}
    except BaseException as exc:  # noqa: BLE001 - the parent asserts on the type and message
        return {"error": type(exc).__name__, "message": str(exc), "step": getattr(exc, "step", None),
                "traceback": traceback.format_exc()}


def _worker(rank: int, port: int, store: str, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import engine.distill as distill_module
    import engine.distill.checkpoint
    import engine.distill.loop
    from featurestore.distributed import destroy as shutdown
    from featurestore.distributed import init_process_group_from_env as init_from_env

    ctx = init_from_env("cpu", timeout=timedelta(seconds=TIMEOUT_S))
    assert ctx.owns_group and ctx.backend == "gloo" and (ctx.rank, ctx.world_size) == (rank, WORLD)
    store_path, tmp_path = Path(store), Path(tmp)
    results: dict = {}

    # One step, kept graph (each rank's 5 or 4 copies fit) and chunked re-runs (chunks of 2).
    for chunk in (10**6, 2):
        loss, grads = _gradient_step(chunk, True, rank, WORLD)
        results[f"grad_{chunk}"] = (loss, grads)

    # An 8-step run; count what this rank writes.
    writes: dict[str, int] = {}
    _count_writes([engine.distill.loop, engine.distill.checkpoint], writes)
    run = distill_module.distill(_config(store_path, tmp_path / "dist"))
    results["run"] = {"images": run.images, "losses": run.losses, "rank": run.rank, "world": run.world_size,
                      "writes": dict(writes)}

    # --lr-schedule plateau: rank 0 reads the fit, every rank takes the same rate (a rule that halves it at
    # every check after the first).
    import engine.distill.config
    import engine.distill.run
    rule = engine.distill.config.PlateauRule(every=2, patience=1, factor=0.5, rel_delta=0.5)
    engine.distill.config.PLATEAU = engine.distill.run.PLATEAU = rule
    plateau = distill_module.distill(_config(store_path, tmp_path / "plateau", lr_schedule="plateau"))
    engine.distill.config.PLATEAU = engine.distill.run.PLATEAU = engine.distill.config.PlateauRule()
    results["plateau"] = {"images": plateau.images, "losses": plateau.losses}

    # --pixel-prior: rank 0 alone adds the prior's gradient (the ranks' gradients are summed).
    prior = distill_module.distill(_config(store_path, tmp_path / "prior", pixel_prior=10.0))
    results["prior"] = {"images": prior.images, "losses": prior.losses}

    # Ctrl-C on rank 1 during step 3: both ranks stop after step 2; then resume to the end.
    def interrupt(call, loss):
        if rank == 1 and call == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    restore = _patch_loss(interrupt)
    results["interrupted"] = _outcome(lambda: distill_module.distill(_config(store_path, tmp_path / "ctrl_c")))
    restore()
    # Read by both ranks right away: rank 1 too finds the checkpoint rank 0 saved.
    results["interrupted_checkpoint_step"] = torch.load(tmp_path / "ctrl_c" / "checkpoint.pt",
                                                        weights_only=False)["step"]
    resumed = _outcome(lambda: distill_module.distill(_config(store_path, tmp_path / "ctrl_c", resume=True)))
    if "ok" in resumed:
        resumed["ok"] = {"images": resumed["ok"].images, "losses": resumed["ok"].losses,
                         "resumed_from": resumed["ok"].resumed_from}
    results["resumed"] = resumed

    # A non-finite loss seen by rank 1 only (a loss differs between ranks only on broken hardware):
    # both ranks stop at step 2.
    restore = _patch_loss(lambda call, loss: loss * float("nan") if rank == 1 and call == 2 else loss)
    results["nan"] = _outcome(lambda: distill_module.distill(_config(store_path, tmp_path / "nan", steps=8,
                                                                     checkpoint_every=1)))
    restore()

    # A setup error on rank 1 only: rank 0 must not start (nor write) either.
    results["setup"] = _outcome(lambda: distill_module.distill(
        _config(store_path, tmp_path / "setup", resume=rank == 1)))

    torch.save(results, tmp_path / f"rank{rank}.pt")
    shutdown(ctx)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(store, tmp_path_factory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("dist")
    context = mp.start_processes(_worker, args=(_free_port(), str(store), str(tmp)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD}-process run did not finish in {TIMEOUT_S} s (deadlock?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_one_distributed_step_has_the_single_process_loss_and_gradients(distributed_results):
    _, ranks = distributed_results
    ref_loss, ref_grads = _gradient_step(10**6, distributed=False)
    assert all(g.abs().max() > 0 for g in ref_grads)
    for results in ranks:
        for chunk in (10**6, 2):
            loss, grads = results[f"grad_{chunk}"]
            torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
            assert len(grads) == len(ref_grads)
            for got, want in zip(grads, ref_grads):
                torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    # The all-reduce leaves the very same gradient on every rank.
    for a, b in zip(ranks[0]["grad_2"][1], ranks[1]["grad_2"][1]):
        assert torch.equal(a, b)


def test_distributed_run_matches_single_process_and_rank_0_writes_once(distributed_results, store, tmp_path):
    from engine.distill import distill

    tmp, ranks = distributed_results
    single = distill(_config(store, tmp_path / "single"))
    run0, run1 = ranks[0]["run"], ranks[1]["run"]
    assert (run0["rank"], run1["rank"], run0["world"]) == (0, 1, WORLD)
    assert torch.equal(run0["images"], run1["images"]) and run0["losses"] == run1["losses"]
    assert len(run0["losses"]) == 8
    torch.testing.assert_close(torch.tensor(run0["losses"]), torch.tensor(single.losses), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(run0["images"], single.images, atol=1e-5, rtol=0)
    assert (run0["images"] - single.images).abs().max() < 1e-5
    # Rank 1 wrote nothing; rank 0 every output, once.
    assert sum(run1["writes"].values()) == 0
    assert run0["writes"]["append_metric"] == 8 and run0["writes"]["save_safetensors"] == 1
    dist_out, single_out = tmp / "dist", tmp_path / "single"
    files = sorted(p.relative_to(dist_out).as_posix() for p in dist_out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(single_out).as_posix() for p in single_out.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith(".tmp")]
    lines = [json.loads(x) for x in (dist_out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 9))
    config = json.loads((dist_out / "config.json").read_text())
    assert config["distributed"]["world_size"] == WORLD and config["distributed"]["backend"] == "gloo"
    assert config["distributed"]["copies_per_rank"] == [10, 10] and config["steps_done"] == 8
    ckpt = torch.load(dist_out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 8
    # A distributed checkpoint resumes in a single process (the problem does not depend on the world size).
    extended = distill(_config(store, dist_out, steps=9, resume=True))
    straight = distill(_config(store, tmp_path / "single5", steps=9))
    torch.testing.assert_close(extended.images, straight.images, atol=1e-5, rtol=0)


def test_the_plateau_schedule_takes_rank_0s_fit_on_every_rank(distributed_results, store, tmp_path, monkeypatch):
    """Under torchrun the fit is read by rank 0 and sent to the others: every rank steps at the same rates,
    the run is the single-process one (within the all-reduce's rounding)."""
    from engine.distill import config as config_module, distill, run as run_module

    tmp, ranks = distributed_results
    assert torch.equal(ranks[0]["plateau"]["images"], ranks[1]["plateau"]["images"])
    lines = [json.loads(x) for x in (tmp / "plateau" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["lr_scale"]) for m in lines if "fit_loss" in m] == [(2, 1.0), (4, 0.5), (6, 0.25)]
    rule = config_module.PlateauRule(every=2, patience=1, factor=0.5, rel_delta=0.5)
    monkeypatch.setattr(config_module, "PLATEAU", rule)
    monkeypatch.setattr(run_module, "PLATEAU", rule)
    single = distill(_config(store, tmp_path / "single", lr_schedule="plateau"))
    torch.testing.assert_close(ranks[0]["plateau"]["images"], single.images, atol=1e-5, rtol=0)
    single_lines = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in lines if "loss" in m] == [m["lr"] for m in single_lines if "loss" in m]


def test_the_pixel_prior_counts_once_over_the_ranks(distributed_results, store, tmp_path):
    """Every rank holds the same images, those of the single-process run (added on every rank, the prior's
    gradient would count twice), which the prior moved away from the run without it."""
    from engine.distill import distill

    tmp, ranks = distributed_results
    assert torch.equal(ranks[0]["prior"]["images"], ranks[1]["prior"]["images"])
    single = distill(_config(store, tmp_path / "single", pixel_prior=10.0))
    torch.testing.assert_close(ranks[0]["prior"]["images"], single.images, atol=1e-5, rtol=0)
    without = distill(_config(store, tmp_path / "without"))
    assert (single.images - without.images).abs().max() > 1e-2
    lines = [json.loads(x) for x in (tmp / "prior" / "metrics.jsonl").read_text().splitlines()]
    assert len([m for m in lines if "pixel_prior" in m]) == 8


def test_ctrl_c_on_one_rank_stops_every_rank_and_resumes_bit_for_bit(distributed_results):
    tmp, ranks = distributed_results
    for results in ranks:
        interrupted = results["interrupted"]
        assert interrupted.get("error") == "DistillInterrupted", interrupted.get("traceback")
        assert interrupted["step"] == 2
        assert results["interrupted_checkpoint_step"] == 2
    for r, results in enumerate(ranks):
        resumed = results["resumed"]
        assert "ok" in resumed, resumed.get("traceback")
        assert resumed["ok"]["resumed_from"] == 2
        assert resumed["ok"]["losses"] == ranks[r]["run"]["losses"]
        assert torch.equal(resumed["ok"]["images"], ranks[r]["run"]["images"])


def test_non_finite_loss_on_one_rank_stops_every_rank(distributed_results):
    tmp, ranks = distributed_results
    for results in ranks:
        nan = results["nan"]
        assert nan.get("error") == "NonFiniteLossError", nan.get("traceback")
        assert "loss became nan at step 2" in nan["message"]
    ckpt = torch.load(tmp / "nan" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 1
    assert not (tmp / "nan" / "distilled.safetensors").exists()


def test_setup_error_on_one_rank_stops_every_rank_before_writing(distributed_results):
    tmp, ranks = distributed_results
    rank0, rank1 = ranks[0]["setup"], ranks[1]["setup"]
    assert rank1.get("error") == "DistillError" and "no checkpoint.pt" in rank1["message"]
    assert rank0.get("error") == "DistillError" and "another rank could not start" in rank0["message"]
    assert not (tmp / "setup").exists()
