"""Checkpoints of a run: `checkpoint.pt` in the output directory, written every `checkpoint_every` steps,
at the end and on Ctrl-C, to a temp file then renamed. A checkpoint resumes only a run that agrees on
every option that defines the optimization problem (`RESUME_KEYS` and the objective's options)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from engine.distill.config import DistillConfig, DistillError, parse_real_batch
from engine.objectives import objective_config
from featurestore.runtime import atomic_write_bytes

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 2
# Options that define the optimization problem, besides the objective's own.
RESUME_KEYS = ("store", "backbone", "split", "method", "ipc", "lr", "augs", "real_batch", "param", "init",
               "grow_every", "real_source", "augment", "seed", "weights", "image_size")


def store_id(store: str) -> str:
    """The store as recorded in config.json / checkpoints: a resolved local path, or the URL as given."""
    from featurestore.store import store_location

    location = store_location(store)
    return str(location.local_path.resolve()) if location.local_path is not None else location.url


def run_identity(cfg: DistillConfig) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed by `cfg`."""
    from dataclasses import asdict

    ident = {k: getattr(cfg, k) for k in RESUME_KEYS}
    ident["store"] = store_id(cfg.store)
    ident["real_batch"] = parse_real_batch(cfg.real_batch)
    ident["objective"] = asdict(objective_config(cfg.method, cfg.objective))
    return ident


def checkpoint_bytes(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def save_checkpoint(out: Path, state: dict[str, Any]) -> None:
    atomic_write_bytes(out / CHECKPOINT, checkpoint_bytes({"format": CHECKPOINT_FORMAT, **state}))


def load_checkpoint(out: Path, cfg: DistillConfig) -> dict[str, Any]:
    """The checkpoint in `out`, checked against `cfg`; DistillError (one line) when it cannot resume it."""
    try:
        state = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a truncated/foreign file raises many types
        raise DistillError(f"cannot read {out / CHECKPOINT} ({type(exc).__name__}: {exc}); "
                           f"start a new run in another --out") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        if isinstance(found, int) and found < CHECKPOINT_FORMAT:
            raise DistillError(f"{out / CHECKPOINT} was written by an older probe-distill (checkpoint format "
                               f"{found}, this one reads {CHECKPOINT_FORMAT}): it cannot be resumed; start a new "
                               f"run in another --out")
        raise DistillError(f"{out / CHECKPOINT} is not a probe-distill checkpoint of format {CHECKPOINT_FORMAT}")
    saved = state["run"]
    ours = run_identity(cfg)
    diff = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {ours.get(k)!r}" for k in ours if saved.get(k) != ours.get(k)]
    if diff:
        raise DistillError(f"--resume: the checkpoint in {out} was made with other options ({'; '.join(diff)}); "
                           f"use the same options, or a new --out")
    return state
