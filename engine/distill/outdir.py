"""A run's output directory (--out): the names of what a run writes there, and when a directory may be
used (new or empty, resumed from its checkpoint, or the leftovers of a run that never checkpointed).

The demo and the benchmarks read runs through these names too."""

from __future__ import annotations

import sys
from pathlib import Path

from engine.distill.config import DistillError
from featurestore.runtime import LOCK_FILE, is_locked, require_writable

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
DISTILLED_FILE = "distilled.safetensors"  # written last but one: its presence means the run finished
IMAGES_DIR = "images"  # the distilled set as an ImageFolder
GRID_FILE = "grid.png"
LOSS_PLOT_FILE = "loss.png"

# What a run writes before its first checkpoint: a directory holding only these (and no checkpoint) is a
# run that died early, and the same command starts it again.
EARLY_FILES = frozenset({CONFIG_FILE, METRICS_FILE, LOCK_FILE})


def out_entries(out: Path) -> set[str]:
    """The names in --out, without the hidden temp files and folders of atomic writes (`.<name>.*`): a run
    killed in the middle of one leaves them, and they must not make its directory look used."""
    if not out.is_dir():
        return set()
    return {p.name for p in out.iterdir() if p.name == LOCK_FILE or not p.name.startswith(".")}


def check_out_dir(out: Path, resume: bool, main: bool = True) -> bool:
    """Checks --out before anything is loaded; returns whether to resume from its checkpoint.

    A directory another live run holds is refused (naming it); a directory that holds only the files of a
    run that never checkpointed (killed, or a non-finite loss at the first steps) starts again, with or
    without --resume; a directory that cannot be written is refused now, not after loading everything.
    Only rank 0 (`main`) looks at the lock: it alone takes it (the other ranks could see it still held by
    rank 0 in the instant after a previous run)."""
    holder = is_locked(out) if main else None
    if holder is not None:
        raise DistillError(f"--out {out} is in use by another run ({holder}): wait for it to finish, or "
                           f"choose another --out")
    entries = out_entries(out)
    abandoned = bool(entries) and entries <= EARLY_FILES and (out / CONFIG_FILE).is_file()
    if resume:
        if (out / CHECKPOINT_FILE).is_file():
            return True
        if not abandoned:
            raise DistillError(f"--resume: no {CHECKPOINT_FILE} in {out}; start a new run without --resume")
    elif not abandoned and not (entries <= {LOCK_FILE}):
        raise DistillError(f"--out {out} exists and is not empty: choose a new directory, or pass --resume to "
                           f"continue the run in it")
    if abandoned and main:
        print(f"note: {out} holds a run that stopped before its first checkpoint: starting it again from step 0",
              file=sys.stderr)
    require_writable(out, DistillError)
    return False


def recheck_out_dir(out: Path, resumed: bool) -> None:
    """Called with the lock held: --out was checked before the (slow) loads, without the lock; a run into
    the same --out that finished or checkpointed meanwhile must not be overwritten."""
    if resumed:
        return  # the checkpoint was read before the lock; the run continues from it, as it would have
    entries = out_entries(out)
    if not entries <= EARLY_FILES:
        raise DistillError(f"--out {out} was written by another run while this one was loading "
                           f"({', '.join(sorted(entries - EARLY_FILES))}): choose another --out, or pass --resume "
                           f"to continue the run in it")
