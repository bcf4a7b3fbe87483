"""The state of a distillation run (`Run`: what `prepare` builds and the steps share) and its result."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine.distill.checkpoint import run_identity
from engine.distill.config import PLATEAU, DistillConfig, DistillError, NonFiniteLossError, scheduled_lr
from engine.distill.adam import RowUpdate, adam
from engine.distill.backprop import PendingBackward
from engine.distill.members import Member
from engine.distill.pixel_prior import PixelStatistics
from engine.distill.outdir import METRICS_FILE
from engine.objectives import Objective
from engine.parameterizations import SyntheticImages
from featurestore.distributed import DistContext, broadcast_object
from engine.outputs import append_metric
from featurestore.runtime import write_errors


@dataclass
class DistillResult:
    out: Path
    images: Tensor  # float32 [N, 3, R, R] in [0, 1]
    labels: Tensor  # int64 [N]
    class_names: list[str]
    losses: list[float]  # one per completed step, from step 1
    steps_done: int
    resumed_from: int | None
    config: dict[str, Any] = field(default_factory=dict)
    rank: int = 0  # this process' rank under torchrun (0 in a single process); rank 0 wrote the outputs
    world_size: int = 1


@dataclass
class Run:
    """Everything `setup` prepares and the steps share."""

    cfg: DistillConfig
    ctx: DistContext
    out: Path
    store: Any
    members: list[Member]
    objective: Objective
    generators: dict[str, torch.Generator]
    synthetic: SyntheticImages
    optimizer: torch.optim.Optimizer
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    start_step: int
    resumed: bool
    lr_history: list[dict[str, Any]]
    resolved: dict[str, Any]  # what the automatic options resolved to (grow_every, real_batch)
    last_saved: int | None = None
    lr_schedule: str = "constant"  # --lr-schedule

    plateau_scale: float = 1.0  # --lr-schedule plateau: the factor on the base rate after the checks so far
    pixel_stats: PixelStatistics | None = None  # --pixel-prior: the real images' statistics (rank 0's only)
    last_prior: float | None = None  # --pixel-prior: the prior's weighted value at the last step (rank 0)

    def __post_init__(self) -> None:
        self._update_plateau_scale()  # a resumed run continues the schedule its checkpoint's checks give

    def _update_plateau_scale(self) -> float:
        self.plateau_scale = PLATEAU.scale([m["fit_loss"] for m in self.metrics if "fit_loss" in m])
        return self.plateau_scale

    @property
    def main(self) -> bool:
        return self.ctx.is_main

    @property
    def splits(self) -> list[Any]:
        return [m.split for m in self.members]

    def lr_at(self, index: int) -> float:
        """The rate of step `index` (0-based): the current base rate (--lr, changed on a resume from the
        step it was given), scheduled over the run's --steps."""
        return scheduled_lr(self.lr_history[-1]["lr"], self.lr_schedule, index, self.cfg.steps,
                            self.plateau_scale if self.lr_schedule == "plateau" else 1.0)

    def optimizer_step(self, index: int, pending: PendingBackward | None = None) -> None:
        """Adam's update of step `index` (0-based) at its scheduled rate: from the parameters' `.grad`, or,
        given the step's pending back-propagation, image by image as it runs (`PendingBackward.into_adam`)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(index)
        if pending is None:
            self.optimizer.step()
        else:
            pending.into_adam(RowUpdate(self.optimizer))
        # The gradient is not needed again before the next step's backward: freeing it now keeps it out of
        # the checkpoint, the set-fit check and the quick probe, which hold other set-sized tensors.
        self.optimizer.zero_grad(set_to_none=True)

    def quick_probe_if_due(self, index: int, record: dict[str, Any], clock: Clock, bar, loss_value: float) -> None:
        """--eval-every: the quick probe of the current images when due; its time is not distillation time."""
        members = [m for m in self.members if m.quick_probe is not None]
        if not members or not (index % self.cfg.eval_every == 0 or index == self.cfg.steps):
            return
        started = time.perf_counter()
        by_backbone = {m.name: round(m.quick_probe(), 3) for m in members}
        top1 = sum(by_backbone.values()) / len(by_backbone)
        seconds = time.perf_counter() - started
        clock.exclude(seconds)
        entry = {"step": index, "probe_top1": round(top1, 3), "probe_seconds": round(seconds, 3),
                 "seconds": record["seconds"]}
        if len(by_backbone) > 1:
            entry["probe_top1_by_backbone"] = by_backbone
        self.metrics.append(entry)
        if self.main:
            with self.writes():
                append_metric(self.out / METRICS_FILE, entry)
        bar.set_postfix(loss=f"{loss_value:.4f}", probe=f"{top1:.1f}%", refresh=False)

    def fit_check_if_due(self, index: int, clock: Clock) -> None:
        """--lr-schedule plateau, before step `index` (0-based) when due (every PLATEAU.every steps, not at
        the start or the end, once: a checkpoint taken after it holds it): the current images' fit, computed
        by rank 0 and sent to the others. Its time is distillation time: the schedule needs it."""
        if (self.lr_schedule != "plateau" or index == 0 or index % PLATEAU.every or index >= self.cfg.steps
                or any(m.get("step") == index and "fit_loss" in m for m in self.metrics)):
            return
        started = time.perf_counter()
        fits = {m.name: m.fit() for m in self.members} if self.main else None
        fits = broadcast_object(fits)
        weights = [m.weight for m in self.members]  # the loss's weights (they sum to 1)
        entry = {"step": index, "fit_loss": round(sum(w * loss for w, (loss, _) in zip(weights, fits.values())), 6),
                 "fit_top1": round(sum(w * top1 for w, (_, top1) in zip(weights, fits.values())), 3),
                 "fit_seconds": round(time.perf_counter() - started, 3),
                 "seconds": round(clock.seconds(time.perf_counter()), 6)}
        if len(fits) > 1:
            entry["fit_by_backbone"] = {name: {"loss": round(loss, 6), "top1": round(top1, 3)}
                                        for name, (loss, top1) in fits.items()}
        self.metrics.append(entry)
        entry["lr_scale"] = self._update_plateau_scale()
        if self.main:
            with self.writes():
                append_metric(self.out / METRICS_FILE, entry)

    def writes(self):
        """Around every write into --out: an OSError (disk full, permission lost) becomes one line saying
        how to go on. Checkpoints are written atomically, so the last one on disk is always whole."""
        then = (f"rerun the same command with --resume (the checkpoint of step {self.last_saved} is intact)"
                if self.last_saved is not None else
                "rerun the same command (no checkpoint was written yet: it starts again from step 0)")
        return write_errors(f"to --out {self.out}", then, DistillError)

    def after_a_lost_rank(self) -> str:
        """How to go on once another rank stopped mid-run: nothing more is written (a half-finished step is
        not saved), so the last checkpoint on disk, written atomically, is the one to resume from."""
        resume = "rerun the same command with --resume to continue from it"
        if not self.main:  # rank 0 writes the checkpoints and knows which; this rank only their schedule
            return f"the last checkpoint rank 0 wrote in --out {self.out} is intact: {resume}"
        if self.last_saved is not None:
            return f"the checkpoint of step {self.last_saved} in --out {self.out} is intact: {resume}"
        return "no checkpoint was written yet: rerun the same command (it starts again from step 0)"

    def checkpoint_state(self, step: int) -> dict[str, Any]:
        """What the checkpoint after `step` steps holds (engine.distill.checkpoint)."""
        return {
            "step": step, "run": run_identity(self.cfg, self.splits, self.resolved),
            "synthetic": self.synthetic.state_dict(),
            "optimizer": self.optimizer.state_dict(), "lr_history": self.lr_history,
            "generators": {k: g.get_state() for k, g in self.generators.items()}, "metrics": self.metrics,
            **({"pixel_statistics": {k: v.cpu() for k, v in self.pixel_stats.state_dict().items()}}
               if self.pixel_stats is not None else {})}

    def step_draws(self) -> dict[str, Any]:
        """The states of the generators a step draws from (all but the init stream), to rewind them."""
        return {k: g.get_state() for k, g in self.generators.items() if k != "init"}

    def rewind(self, states: dict[str, Any]) -> None:
        """The generators back to `states` (`step_draws`, taken before a step whose draws must not count)."""
        for k, state in states.items():
            self.generators[k].set_state(state)

    def nonfinite_loss(self, loss_value: float, index: int) -> NonFiniteLossError:
        """The error for a non-finite loss at step `index` (0-based), saying how to go on."""
        if self.last_saved is not None:
            advice = (f"the last good checkpoint (step {self.last_saved}) is kept: rerun with --resume "
                      f"and a lower --lr (now {self.lr_history[-1]['lr']:.3g}) to continue from it with the "
                      f"new rate")
        else:
            advice = (f"no checkpoint was written yet: rerun the same command with a lower --lr "
                      f"(now {self.lr_history[-1]['lr']:.3g}); it starts again from step 0")
        return NonFiniteLossError(f"the loss became {loss_value} at step {index + 1}; {advice}")


@dataclass
class Clock:
    """A run's distillation time: the seconds before a resume plus this process's, the quick probes' excluded."""

    before: float
    start: float = field(default_factory=time.perf_counter)

    def seconds(self, now: float) -> float:
        return self.before + now - self.start

    def exclude(self, seconds: float) -> None:
        self.start += seconds


def stepping_run(ctx: DistContext, members: list[Member], objective: Objective, synthetic: SyntheticImages,
                 generators: dict[str, torch.Generator], lr: float) -> Run:
    """A Run that only steps (`loop.step`): no store, no --out, nothing written. What the GPU check
    times, so that it measures the step `engine distill` ships."""
    return Run(cfg=DistillConfig(store="", out=""), ctx=ctx, out=Path(), store=None, members=members,
               objective=objective, generators=generators, synthetic=synthetic,
               optimizer=adam(synthetic.parameters(), lr), config={}, metrics=[], start_step=0,
               resumed=False, lr_history=[{"from_step": 0, "lr": lr}], resolved={})
