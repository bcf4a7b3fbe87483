"""Checkpoints of a run: `checkpoint.pt` in the output directory, written every `checkpoint_every` steps,
at the end and on Ctrl-C, to a temp file then renamed.

A checkpoint holds only tensors and plain data (numbers, strings, lists, dicts) and is read with
`torch.load(weights_only=True)`, whose unpickler refuses anything else: a crafted file cannot run code.
It resumes only a run that agrees on every option that defines the optimization problem (`RESUME_KEYS`,
the objective's options) and on the content of the store (fingerprint of the backbone, identity of the
samples, a digest of the stored features): a store rebuilt at the same path from other images, or
from other pixels under the same file names, is refused. The learning rate may change
on resume (the way out of a diverged run); the change is recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine.distill.config import DistillConfig, DistillError
from engine.distill.outdir import CHECKPOINT_FILE
from engine.objectives import objective_config
from featurestore.runtime import atomic_write_stream

CHECKPOINT_FORMAT = 2
# Options that define the optimization problem, besides the objective's own.
RESUME_KEYS = ("store", "backbone", "split", "method", "ipc", "augs", "real_batch", "param", "init", "colour",
               "decorrelate", "grow_every", "real_source", "augment", "seed", "weights", "image_size", "feature_space",
               "pixel_prior")
# Options added after checkpoints were made without them: the value those checkpoints ran with.
RESUME_KEYS_ADDED = {"feature_space": "raw", "pixel_prior": 0.0}
_STATE_KEYS = ("format", "step", "run", "synthetic", "optimizer", "generators", "metrics")


def store_id(store: str) -> str:
    """The store as recorded in config.json / checkpoints: a resolved local path, or the URL as given."""
    from featurestore.store import store_location

    location = store_location(store)
    return str(location.local_path.resolve()) if location.local_path is not None else location.url


def store_content(split) -> dict[str, Any]:
    """What the store held for this run: the backbone's fingerprint, the identity of the samples and a
    digest of the stored features and labels (so other pixels under the same sample ids differ)."""
    return {"fingerprint": split.fingerprint, "samples_digest": split.attrs.get("samples_digest"),
            "rows": split.n, "num_classes": split.store.num_classes, "content_digest": split.content_digest()}


def _same_store_content(saved: Any, ours: list[dict[str, Any]]) -> bool:
    """Checkpoints written before the content digest existed are compared on what they recorded."""
    if not isinstance(saved, list) or len(saved) != len(ours):
        return False
    return all(isinstance(s, dict) and s == ({k: v for k, v in o.items() if k != "content_digest"}
                                             if "content_digest" not in s else o)
               for s, o in zip(saved, ours))


def run_identity(cfg: DistillConfig, splits: list, resolved: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed by `cfg` on `splits` (the real side of each backbone); the
    automatic options count by what they resolved to (`resolved`: grow_every, real_batch), so a resume
    that would change them (another device's budget) is refused; --grow-every auto is taken from the
    checkpoint on resume (the loop), so --steps may grow."""
    from dataclasses import asdict

    ident = {k: getattr(cfg, k) for k in RESUME_KEYS}
    ident["store"] = store_id(cfg.store)
    ident.update(resolved)
    ident["objective"] = asdict(objective_config(cfg.method, cfg.objective))
    ident["backbone_weight"] = cfg.backbone_weight
    ident["store_content"] = [store_content(split) for split in splits]
    return ident


def save_checkpoint(out: Path, state: dict[str, Any]) -> None:
    """Serialized straight into the temp file: the bytes of a checkpoint (the parameters and both Adam
    moments: 3x the synthetic set) are never held in memory beside the tensors themselves (a bytes copy
    was the peak memory of a 1000-image set: benchmarks/bench_distill.md)."""
    atomic_write_stream(out / CHECKPOINT_FILE, lambda fh: torch.save({"format": CHECKPOINT_FORMAT, **state}, fh))


def read_checkpoint(out: Path) -> dict[str, Any]:
    """The checkpoint in `out`, read safely (tensors and plain data only) and checked for its format;
    DistillError (one line) for anything else: a truncated, foreign or crafted file."""
    try:
        state = torch.load(out / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated/foreign/crafted file raises many types
        reason = " ".join(str(exc).split())[:200]
        raise DistillError(f"{out / CHECKPOINT_FILE} is not a readable probe-distill checkpoint ({type(exc).__name__}: "
                           f"{reason}); start a new run in another --out") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        if isinstance(found, int) and found < CHECKPOINT_FORMAT:
            raise DistillError(f"{out / CHECKPOINT_FILE} was written by an older probe-distill (checkpoint format "
                               f"{found}, this one reads {CHECKPOINT_FORMAT}): it cannot be resumed; start a new "
                               f"run in another --out")
        raise DistillError(f"{out / CHECKPOINT_FILE} is not a probe-distill checkpoint of format {CHECKPOINT_FORMAT}")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing or not isinstance(state["run"], dict) or not isinstance(state["step"], int):
        raise DistillError(f"{out / CHECKPOINT_FILE} is damaged (missing or malformed: {', '.join(missing) or 'run/step'}); "
                           f"start a new run in another --out")
    return state


def load_checkpoint(out: Path, cfg: DistillConfig, splits: list, resolved: dict[str, Any],
                    state: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint in `out` (or `state`, already read from it), checked against `cfg` and the store
    split it will run on; DistillError (one line) when it cannot resume it."""
    state = read_checkpoint(out) if state is None else state
    saved = {**RESUME_KEYS_ADDED, **state["run"]}
    ours = run_identity(cfg, splits, resolved)
    if saved.get("backbone") == ours["backbone"] and not _same_store_content(saved.get("store_content"),
                                                                            ours["store_content"]):
        raise DistillError(f"--resume: the store at {cfg.store} changed since the checkpoint in {out} was made "
                           f"(it was {saved.get('store_content')}, it is now {ours['store_content']}): the run "
                           f"cannot continue on other data; start a new run in another --out")
    diff = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {ours.get(k)!r}" for k in ours
            if k != "store_content" and saved.get(k) != ours.get(k)]
    if diff:
        raise DistillError(f"--resume: the checkpoint in {out} was made with other options ({'; '.join(diff)}); "
                           f"use the same options, or a new --out")
    return state
