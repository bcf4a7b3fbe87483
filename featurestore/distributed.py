"""Process-group helpers for runs launched by torchrun or Slurm srun (one process per GPU).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/MASTER_PORT) for every process it starts.
`srun` alone sets SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID instead; those are used only when
MASTER_ADDR is set too, because every Slurm job step has them (a job-array task is a Slurm "task" of
world size 1, and a single `srun python ...` must not start waiting for peers that do not exist).

`init_process_group_from_env(device)` joins the default process group (NCCL when the rank's device is
CUDA, gloo on the CPU, so multi-process runs and tests work on a CPU machine) and is a no-op for a single
process; every helper below then works on that default group and is a no-op (or the identity) in a single
process, so callers write one code path. Generic on purpose (torch and `featurestore.errors`/`runtime`
only): `engine.distributed` imports these and adds only the engine's tensor collectives.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.distributed as dist

from .errors import UserError, one_line

DEFAULT_MASTER_PORT = 29500  # torch's own default for env:// rendezvous


class DistributedError(UserError):
    """The launch environment (torchrun / srun variables) or the device options are inconsistent."""


class PeerLostError(DistributedError):
    """A collective failed because another rank stopped (killed, crashed, stopped by its own error) or
    stopped answering. Its message ends with what the running command registered with
    `if_a_rank_stops` (what is intact on disk, how to go on)."""


@dataclass(frozen=True)
class DistEnv:
    """What the launcher told this process: rank `rank` of `world_size` (1 = a plain single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # processes on this node (decoding workers are shared among them)
    launcher: str | None = None  # "torchrun" | "slurm" | None
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "DistEnv":
        """Read torchrun's variables, else Slurm's (only with MASTER_ADDR set), else a single process."""
        env = os.environ if environ is None else environ
        if "RANK" in env and "WORLD_SIZE" in env:
            names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
            launcher = "torchrun"
        elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
            names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE")
            launcher = "slurm"
        else:
            return cls()
        try:
            rank, world = int(env[names[0]]), int(env[names[1]])
            local_rank = int(env.get(names[2], rank))
            # SLURM_NTASKS_PER_NODE looks like "4" or "4(x2)" (heterogeneous nodes: "4(x2),2").
            local_world = int(str(env.get(names[3], world)).split("(")[0].split(",")[0])
            port = env.get("MASTER_PORT")
            master_port = int(port) if port else None
        except ValueError:
            raise DistributedError(f"{', '.join(names[:3])} and MASTER_PORT must be integers (the launcher sets "
                                   f"them): launch with torchrun or srun, or unset them for a single process") from None
        if not (world >= 1 and 0 <= rank < world and local_rank >= 0):
            raise DistributedError(f"{names[0]}={rank} {names[1]}={world} {names[2]}={local_rank} is not a valid "
                                   f"launch (need 0 <= rank < world size): launch with torchrun or srun")
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in env]
        if world > 1 and launcher == "torchrun" and missing:
            # env:// rendezvous needs both; refuse here with one line instead of torch's traceback later.
            raise DistributedError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} "
                                   f"{'is' if len(missing) == 1 else 'are'} not: launch with torchrun "
                                   "(which sets all of them), or unset RANK/WORLD_SIZE for a single process")
        return cls(rank=rank, world_size=world, local_rank=local_rank, local_world_size=max(1, local_world),
                   launcher=launcher, master_addr=env.get("MASTER_ADDR"), master_port=master_port)


@dataclass(frozen=True)
class DistContext:
    """A process after `init_process_group_from_env`: its launch environment, device and backend."""

    env: DistEnv
    device: torch.device
    backend: str | None  # "nccl" | "gloo" | None (single process)
    owns_group: bool  # this call created the default group (so `destroy(ctx)` tears it down)

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def local_rank(self) -> int:
        return self.env.local_rank

    @property
    def is_distributed(self) -> bool:
        return self.env.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0


def rank_device(device: str | torch.device | None, env: DistEnv) -> torch.device:
    """The device of one rank. Single process: 'auto' -> cuda if available else cpu, anything explicit
    as given. Several processes: 'auto'/'cuda' -> cuda:LOCAL_RANK (the one-process-per-GPU convention),
    'cpu' -> cpu; an explicit 'cuda:N' is refused (every rank would pick the same GPU)."""
    from .runtime import pick_device

    if not env.is_distributed:
        return pick_device(None if device is None else str(device))
    name = "auto" if device is None else str(device)
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise DistributedError(f"--device {name}: with several processes each rank uses cuda:LOCAL_RANK; "
                               f"pass --device auto, cuda or cpu (restrict GPUs with CUDA_VISIBLE_DEVICES)")
    pick_device("cuda")  # one clear error when cuda is asked for without a GPU
    count = torch.cuda.device_count()
    if env.launcher == "slurm" and count == 1:
        return torch.device("cuda", 0)  # srun --gpus-per-task=1: each task sees only its own GPU
    if env.local_rank >= count:
        raise DistributedError(f"local rank {env.local_rank} has no GPU (this node has {count}): start at most "
                               f"{count} processes per node (torchrun --nproc-per-node {count})")
    return torch.device("cuda", env.local_rank)


def init_process_group_from_env(device: str | torch.device | None = "auto", *,
                                timeout: timedelta | None = None) -> DistContext:
    """Join the default process group when the launcher started several processes (NCCL for CUDA ranks,
    gloo for CPU ranks); a no-op for a single process. A default group the caller already initialized
    is reused (and left alone by `destroy`)."""
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        try:
            launched = DistEnv.from_env()
        except DistributedError:
            # The caller's group may come from its own init_method, not from launcher variables: the group
            # itself is the authority on rank and world size, so incomplete variables are no error here.
            launched = DistEnv()
        env = DistEnv(rank=dist.get_rank(), world_size=world,
                      local_rank=launched.local_rank if launched.world_size == world else dist.get_rank(),
                      local_world_size=launched.local_world_size if launched.world_size == world else world,
                      launcher=launched.launcher, master_addr=launched.master_addr,
                      master_port=launched.master_port)
        backend = str(dist.get_backend()) if world > 1 else None
        dev = torch.device("cpu") if backend == "gloo" and device in (None, "auto") else rank_device(device, env)
        return DistContext(env, dev, backend, owns_group=False)
    env = DistEnv.from_env()
    dev = rank_device(device, env)
    if not env.is_distributed:
        return DistContext(env, dev, None, owns_group=False)
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed: run a single process")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "rank": env.rank, "world_size": env.world_size}
    if env.launcher == "slurm":
        # srun sets no MASTER_PORT; torchrun's env:// rendezvous would require it.
        host = env.master_addr if ":" not in str(env.master_addr) else f"[{env.master_addr}]"
        kwargs["init_method"] = f"tcp://{host}:{env.master_port or DEFAULT_MASTER_PORT}"
    if timeout is not None:
        kwargs["timeout"] = timeout
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        kwargs["device_id"] = dev  # binds NCCL to this rank's GPU right away
    dist.init_process_group(**kwargs)
    return DistContext(env, dev, backend, owns_group=True)


def destroy(ctx: DistContext | None = None) -> None:
    """Destroy the default process group: the one `ctx` created, or (no ctx) whatever group exists."""
    if ctx is not None and not ctx.owns_group:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# Queries and collectives on the default group (identity / no-op in a single process)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device() -> torch.device:
    """Where a collective's helper tensors live: NCCL only moves CUDA tensors (the rank's GPU), gloo CPU
    ones. Object collectives move pickles through such tensors too."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------------
# A rank that stops: the others' collectives fail (gloo: "Connection closed by peer" at once; a timeout
# when a peer hangs). Every collective runs inside `guarded_collective`, which turns that into one
# PeerLostError line instead of torch's traceback.

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_advice: list[Callable[[], str]] = []  # what the running command says to do, innermost last


@contextmanager
def if_a_rank_stops(advice: Callable[[], str]) -> Iterator[None]:
    """While inside, a PeerLostError ends with `advice()` (called when a collective fails: it can look at
    how far the command got, e.g. the last checkpoint written)."""
    _advice.append(advice)
    try:
        yield
    finally:
        _advice.pop()


def _peer_lost(exc: BaseException) -> PeerLostError:
    world, rank = dist.get_world_size(), dist.get_rank()
    # Which rank stopped is known only when there is one other (gloo names a socket, not a rank).
    who = f"rank {1 - rank} of 2" if world == 2 else f"another of the {world} ranks"
    # gloo prefixes its source file ("[.../pair.cc:561] ") and appends advice sentences: keep the cause.
    cause = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(exc).split())).split(". ")[0]
    cause = one_line(RuntimeError(cause), 120, with_type=False)
    advice = _advice[-1]() if _advice else "rerun the same command"
    return PeerLostError(f"{who} stopped or stopped answering ({cause}), so rank {rank} stopped too: {advice}")


@contextmanager
def guarded_collective() -> Iterator[None]:
    """Around one collective, up to the point its result is read (NCCL's are asynchronous): a failure
    (another rank stopped) becomes a PeerLostError; Ctrl-C and SIGTERM are held meanwhile.

    Why hold them: a signal cannot interrupt a rank blocked in a collective anyway (Python runs its
    handler only once the call returns), but torchrun sends SIGTERM to the surviving ranks right after one
    dies, so it lands just as the collective fails and would replace the line saying why with a bare
    `interrupted`. A signal held during a collective that succeeded is delivered again right after it;
    one held during a failed collective (the launcher's reaction to the same failure) is dropped."""
    held = threading.current_thread() is threading.main_thread()
    received: list[int] = []
    previous: dict[signal.Signals, Any] = {}
    if held:
        previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}
        # A handler installed outside Python (getsignal() is None) cannot be put back: leave it alone.
        previous = {sig: handler for sig, handler in previous.items() if handler is not None}
        for sig in previous:
            signal.signal(sig, lambda signum, frame: received.append(signum))
    lost = False
    try:
        yield
    except RuntimeError as exc:  # torch.distributed's errors (DistError) are RuntimeErrors
        lost = True
        raise _peer_lost(exc) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if not lost:
            for sig in dict.fromkeys(received):
                signal.raise_signal(sig)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (pickled: for small objects such as plans and messages)."""
    if not is_distributed():
        return obj
    box = [obj]
    with guarded_collective():
        dist.broadcast_object_list(box, src=src, device=collective_device())
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    with guarded_collective():
        dist.all_gather_object(out, obj)
    return out


def all_reduce_int(value: int) -> int:
    """Sum of an integer over ranks."""
    if not is_distributed():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=collective_device())
    with guarded_collective():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return int(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on at least one (every rank must call it)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=collective_device())
    with guarded_collective():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def contiguous_share(total: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous share of `total` items (sizes differ by at most one, later ranks get the
    extra ones; never strided): work units of a build, augmented copies of a distillation step."""
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"shard/rank {rank} of {world} is invalid: need 0 <= rank < world")
    return range(total * rank // world, total * (rank + 1) // world)


def raise_if_any_failed(error: BaseException | None) -> None:
    """Collective: every rank passes the exception it caught (or None); if any rank failed, every rank
    raises: a failed rank its own exception, the others a UserError naming the failing rank. Keeps ranks
    from waiting forever at the next barrier for a peer that already gave up."""
    if not is_distributed():
        if error is not None:
            raise error
        return
    summary = None if error is None else (type(error).__name__, str(error), isinstance(error, UserError))
    outcomes = all_gather_objects(summary)
    if error is not None:
        raise error
    for rank, outcome in enumerate(outcomes):
        if outcome is not None:
            name, message, user = outcome
            raise DistributedError(message if user else f"rank {rank} failed: {name}: {message}")


__all__ = ["DistEnv", "DistContext", "DistributedError", "PeerLostError", "if_a_rank_stops", "guarded_collective",
           "rank_device", "init_process_group_from_env", "destroy",
           "is_distributed", "collective_device", "broadcast_object", "all_gather_objects", "all_reduce_int",
           "any_rank", "contiguous_share", "raise_if_any_failed"]
