"""`fs build` under torchrun (2 gloo processes on the CPU): identical arrays to a single-process build,
resume across a changed world size, a rank killed while the other waits for it; plus the
launch-environment parsing and work assignment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from cli.fs import app as fs_app
from featurestore.build import build, units_for_rank
from featurestore.distributed import contiguous_share as assign_units
from featurestore.distributed import DistEnv, DistributedError, init_process_group_from_env, raise_if_any_failed
from featurestore.errors import StoreError
from featurestore.store import FeatureStore
from tests.torchrun_helpers import launches

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
# 5 per class x 10 classes = 50 rows in 7 units of 8 rows (the last one short).
OPTIONS = dict(splits=["train"], limit_per_class=5, chunk_rows=8, batch_size=4, workers=0, full_cov=True, quiet=True)
CLI_OPTIONS = ["--split", "train", "--limit-per-class", "5", "--chunk-rows", "8", "--batch-size", "4",
               "--workers", "0", "--full-cov"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


def torchrun_build(store: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone` (a free local port) running `fs build`; the whole process group is
    killed if it outlives the timeout, so a hang fails the test instead of leaving orphans."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["PYTHONPATH"] = str(REPO)
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(nproc), "-m", "cli.fs", "build", "gratings",
           "--backbone", "test-cnn", "--store", str(store), *CLI_OPTIONS, *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in 150 s: {err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def assert_groups_identical(a: Path, b: Path) -> None:
    """Every array of test-cnn/train bitwise equal (NaN fill included), and the same attributes."""
    ga = zarr.open_group(str(a), mode="r")["test-cnn"]["train"]
    gb = zarr.open_group(str(b), mode="r")["test-cnn"]["train"]
    names = sorted(name for name, _ in ga.arrays())
    assert names == sorted(name for name, _ in gb.arrays())
    assert "unit_outer" in names and "class_second_moment" in names
    for name in names:
        x, y = ga[name][:], gb[name][:]
        assert x.shape == y.shape and x.dtype == y.dtype, name
        if x.dtype.kind in "fiu":
            assert x.tobytes() == y.tobytes(), f"{name} differs"
        else:
            assert x.tolist() == y.tolist(), f"{name} differs"
    assert dict(ga.attrs) == dict(gb.attrs)


def units_done(store: Path) -> list[int]:
    done = zarr.open_group(str(store), mode="r")["test-cnn"]["train"]["unit_done"][:]
    return np.flatnonzero(done).tolist()


@pytest.fixture(scope="module")
def single_store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("single") / "store"
    report = build("gratings", "test-cnn", store, **OPTIONS)
    assert report.splits[0].complete and report.world_size == 1
    return store


def test_two_gloo_ranks_build_the_same_store_as_one_process(single_store, tmp_path):
    store = tmp_path / "dist"
    result = torchrun_build(store, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    # Only rank 0 reports; `written` counts both ranks.
    assert result.stdout.splitlines() == ["test-cnn/train: complete, 50 rows (50 computed now)"]
    assert_groups_identical(single_store, store)
    sp = FeatureStore.open(store).split("test-cnn", "train")
    assert sp.complete and sp.units_done() == 7 and sp.class_count().tolist() == [5] * 10


def test_resume_with_another_world_size_only_redoes_unfinished_units(single_store, tmp_path):
    store = tmp_path / "resumed"
    # An earlier run of another world size finished units 2 and 3 only (here: shard 1 of 3, one process).
    first = build("gratings", "test-cnn", store, shard="1/3", **OPTIONS).splits[0]
    assert not first.complete and units_done(store) == [2, 3]
    # Two ranks share the 5 unfinished units [0, 1, 4, 5, 6] as [0, 1] and [4, 5, 6]: 34 rows, not 50.
    result = torchrun_build(store, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["test-cnn/train: complete, 50 rows (34 computed now)"]
    assert_groups_identical(single_store, store)
    # A rerun finds it complete and writes nothing.
    again = build("gratings", "test-cnn", store, **OPTIONS).splits[0]
    assert again.already_complete and again.written == 0


def test_a_rank_killed_while_the_other_waits_is_one_line_and_the_rerun_finishes(single_store, tmp_path):
    """Issue 20: rank 0, done with its units and waiting for rank 1 at the barrier, printed gloo's traceback
    when rank 1 was SIGKILLed. Now one line naming rank 1 and how to go on, exit 2; the units on disk are
    intact (`fs verify`: incomplete, not damaged) and the same command finishes the build."""
    store = tmp_path / "killed"
    args = ["build", "gratings", "--backbone", "test-cnn", "--store", str(store), *CLI_OPTIONS, "--quiet"]
    # Units 0-2 are rank 0's, 3-6 rank 1's: rank 1 stops for good before writing its first one; rank 0
    # marks its third collective (the barrier after its units) and goes into it.
    hooks = [{"rank": 1, "target": "featurestore.unit_writer:UnitWriter.finish", "call": 1, "pause": True},
             {"rank": 0, "target": "featurestore.build:raise_if_any_failed", "call": 3, "pause": False}]
    with launches() as start:
        launch = start(tmp_path / "logs", "cli.fs", args, hooks=hooks)
        launch.wait_for_marker(0)
        os.kill(launch.wait_for_marker(1), signal.SIGKILL)
        launch.finish()
    survivor = launch.rank(0)
    lines = [line for line in survivor.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in survivor.stderr, survivor.stderr
    assert lines[0].startswith("error: rank 1 of 2 stopped or stopped answering ("), lines[0]
    assert lines[0].endswith(f"the units finished in {store} are intact (each is written whole, its marker last): "
                             f"rerun the same command to resume the build")
    assert survivor.exit_code == 2
    assert units_done(store) == [0, 1, 2]
    verify = CliRunner().invoke(fs_app, ["verify", "--store", str(store)])
    assert verify.exit_code == 1 and "incomplete (3/7 units" in verify.stdout and "damaged:" not in verify.stdout
    rerun = CliRunner().invoke(fs_app, args)
    assert rerun.exit_code == 0 and rerun.stdout.splitlines() == ["test-cnn/train: complete, 50 rows (26 computed now)"]
    assert_groups_identical(single_store, store)


def test_units_for_rank_splits_the_unfinished_list_contiguously_and_balanced():
    unfinished = [0, 1, 4, 5, 6]
    shares = [units_for_rank(unfinished, r, 2) for r in range(2)]
    assert shares == [[0, 1], [4, 5, 6]]
    for world in (1, 2, 3, 4, 8):
        shares = [units_for_rank(unfinished, r, world) for r in range(world)]
        assert [u for share in shares for u in share] == unfinished  # each unit once, in order
        sizes = [len(s) for s in shares]
        assert max(sizes) - min(sizes) <= 1
    # A strided split (DistributedSampler) would give rank 0 units 0, 4, 6: never.
    assert units_for_rank(list(range(7)), 0, 2) == list(assign_units(7, 0, 2)) == [0, 1, 2]


def test_launch_environment_parsing():
    assert DistEnv.from_env({}) == DistEnv()
    torchrun = DistEnv.from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                                 "MASTER_ADDR": "node1", "MASTER_PORT": "29400"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.local_world_size) == (3, 8, 1, 4)
    assert torchrun.launcher == "torchrun" and torchrun.is_distributed and not torchrun.is_main
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4(x2)"}
    # Every Slurm job step has SLURM_* variables: without MASTER_ADDR they do not mean a process group.
    assert DistEnv.from_env(slurm) == DistEnv()
    env = DistEnv.from_env({**slurm, "MASTER_ADDR": "node1"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.launcher) == (5, 8, 1, 4, "slurm")
    assert env.master_port is None  # the tcp:// rendezvous then uses 29500
    for bad in ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "x"}, {"RANK": "a", "WORLD_SIZE": "2"},
                {"RANK": "0", "WORLD_SIZE": "2"}):
        with pytest.raises(DistributedError):
            DistEnv.from_env(bad)


def test_single_process_context_is_a_no_op(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    ctx = init_process_group_from_env("cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.owns_group, str(ctx.device)) == (0, 1, None, False, "cpu")
    raise_if_any_failed(None)
    with pytest.raises(StoreError, match="boom"):
        raise_if_any_failed(StoreError("boom"))


def test_a_collective_holds_signals_and_drops_those_of_a_lost_rank(monkeypatch):
    """What a rank does around a collective (featurestore.distributed.guarded_collective): a signal that
    arrives meanwhile is delivered once the collective succeeded; when it failed because another rank
    stopped (torchrun's SIGTERM to the survivors follows right away), it is dropped and the failure is one
    PeerLostError line with the running command's advice, gloo's file prefix and advice sentences cut."""
    import torch.distributed as dist

    from featurestore.distributed import PeerLostError, guarded_collective, if_a_rank_stops

    received: list[int] = []

    def handler(signum, frame):  # noqa: ARG001
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with guarded_collective():
            signal.raise_signal(signal.SIGTERM)
            assert received == []
        assert received == [signal.SIGTERM]
        monkeypatch.setattr(dist, "get_world_size", lambda: 2)
        monkeypatch.setattr(dist, "get_rank", lambda: 0)
        with if_a_rank_stops(lambda: "rerun it"), pytest.raises(PeerLostError) as failed:
            with guarded_collective():
                signal.raise_signal(signal.SIGTERM)
                raise RuntimeError("[/src/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:9. "
                                   "This is typically caused by a remote worker crashing.")
        assert str(failed.value) == ("rank 1 of 2 stopped or stopped answering (Connection closed by peer "
                                     "[127.0.0.1]:9), so rank 0 stopped too: rerun it")
        assert failed.value.exit_code == 2
        assert received == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is handler  # the handlers are back
    finally:
        signal.signal(signal.SIGTERM, previous)
