"""The distillation loop: `distill(DistillConfig) -> DistillResult` (`engine distill`), as three named
stages: `setup` (everything that can fail on bad input, before anything is written), `step` (one
optimization step), `finish` (outputs). One code path for any world size (see engine.distill.backprop).

One step (LGM defaults, as the authors' code; other objectives plug in through engine.objectives):
1. grow the pyramid when a level is due (then Adam's state is reset, as the authors do);
2. draw the real batch (features from the store, or end to end from images: `engine.real`);
3. draw `augs` independent augmentations of every synthetic image (flip, random resized crop via an
   affine grid, pixel noise: `featurestore.augment`);
4. features of the M = n * augs augmented copies through the frozen backbone (bf16 autocast on CUDA,
   fp32 on CPU), loss = objective(syn features, real features) with a fresh random head;
5. back-propagate to the image parameters (chunked when the whole graph would not fit) and Adam's update:
   image by image as the back-propagation completes each (one process, one backbone: the default), or
   once from the gradient summed over backbones and ranks (engine.distill.backprop).

Checkpoints (engine.distill.checkpoint) every `checkpoint_every` steps, at the end and on Ctrl-C. A
non-finite loss stops the run before the optimizer step, without writing a checkpoint: the last good
one stays.

Several processes (torchrun): see `engine.distill` (the package docstring).
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack, nullcontext
from typing import Any

import torch
from torch import Tensor

from engine.distill.checkpoint import save_checkpoint
from engine.distill.config import DistillConfig, DistillError
from engine.distill.members import QUICK_PROBE_NOTE
from engine.distill.memory import peak_memory_mb, reset_peak_memory
from engine.distill.outdir import (CONFIG_FILE, DISTILLED_FILE, GRID_FILE, IMAGES_DIR, LOSS_PLOT_FILE, METRICS_FILE,
                                   recheck_out_dir)
from engine.distill.pixel_prior import pixel_prior
from engine.distill.prepare import prepare
from engine.distill.adam import adam, updates_image_by_image
from engine.distill.backprop import PendingBackward
from engine.distill.run import Clock, DistillResult, Run
from engine.distill.signals import DistillInterrupted, defer_sigint, sigterm_as_ctrl_c, stop_flags
from engine.distributed import reduce_step
from engine.imagefolder import write_imagefolder
from engine.outputs import append_metric, save_grid, save_loss_plot, save_safetensors, write_metrics
from featurestore.distributed import DistContext, any_rank, destroy, if_a_rank_stops, init_process_group_from_env
from featurestore.progress import progress
from featurestore.runtime import atomic_write_json, exclusive_lock


def distill(cfg: DistillConfig) -> DistillResult:
    """Run (or resume) a distillation; writes everything into `cfg.out` (see the module docstring).
    Under torchrun, every rank calls this and rank 0 writes."""
    cfg.validate()
    ctx = init_process_group_from_env(cfg.device)
    started: list[Run] = []
    # Another rank that stops ends this one at its next collective with one line (PeerLostError) saying
    # how to go on; nothing is written after it, so the last checkpoint stands.
    lost = if_a_rank_stops(lambda: started[0].after_a_lost_rank() if started else
                           "nothing was written yet: rerun the same command")
    with ExitStack() as held, lost:  # held: the output directory's lock, rank 0's until the outputs are written
        try:
            run = setup(cfg, ctx, held)
            started.append(run)
            steps(run)
            return finish(run)
        finally:
            destroy(ctx)


def setup(cfg: DistillConfig, ctx: DistContext, held: ExitStack) -> Run:
    """Every check and every load, agreed on by all ranks; then rank 0 takes the output directory's lock
    (kept in `held`, agreed on too) and writes config.json. A rank that cannot start stops every rank
    before anything is written: no rank is left waiting in the first step's collectives."""
    run: Run | None = None
    error: Exception | None = None
    try:
        run = prepare(cfg, ctx)
    except Exception as exc:  # noqa: BLE001 - re-raised on this rank below, once every rank knows
        if not ctx.is_distributed:
            raise
        error = exc
    _agree(error)
    assert run is not None
    if run.main:
        try:
            held.enter_context(exclusive_lock(run.out, "output directory"))
            recheck_out_dir(run.out, run.resumed)
        except Exception as exc:  # noqa: BLE001 - see above
            if not ctx.is_distributed:
                raise
            error = exc
    _agree(error)
    if run.main:
        with run.writes():
            atomic_write_json(run.out / CONFIG_FILE, run.config)
            write_metrics(run.out / METRICS_FILE, run.metrics)
    return run


def _agree(error: Exception | None) -> None:
    """Collective: raise on every rank if some rank failed (its own error there, one line elsewhere)."""
    if any_rank(error is not None):
        if error is not None:
            raise error
        raise DistillError("another rank could not start the run (its error is printed by that rank); "
                           "nothing was written")


# ----------------------------------------------------------------------------------------------------
# steps


def save(run: Run, step: int) -> None:
    """The checkpoint after `step` steps; every rank holds the same state, rank 0 writes it."""
    if not run.main:
        return
    with run.writes():
        save_checkpoint(run.out, run.checkpoint_state(step))
    run.last_saved = step


def step(run: Run, index: int, stop_requested: list[bool]) -> tuple[float, list[float], bool, PendingBackward | None]:
    """Optimization step `index` (0-based) up to the update: returns (loss, each backbone's loss, any rank
    asked to stop, the back-propagation left to run inside the update or None). `stop_requested[0]` is
    read at the gradient reduction, after this rank's forward and backward. The update is left to the
    caller (`Run.optimizer_step`, which must not be interrupted halfway).

    One process, one backbone, no --pixel-prior (the default): only the loss is computed here; the
    back-propagation runs inside the update, which applies Adam image by image (engine.distill.backprop):
    no gradient of the whole set is held. Otherwise the gradient is back-propagated into `.grad` here.
    Several backbones: the loss is the weighted mean of their objectives. The copies share one
    augmentation draw; each backbone back-propagates its own term into the shared image parameters (so
    memory stays bounded by one backbone's pass)."""
    synthetic, generators = run.synthetic, run.generators
    # The order of random draws: growth (init stream), real batches, augmentations, then the heads.
    if synthetic.grow(index):
        run.optimizer = adam(synthetic.parameters(), run.lr_history[-1]["lr"])
    reals = [member.real.sample(generators["real"]) for member in run.members]
    augmentations = run.members[0].side.draw(synthetic.n, generators["augment"])
    run.optimizer.zero_grad(set_to_none=True)
    into_adam = updates_image_by_image(len(run.members), run.ctx.is_distributed, bool(run.cfg.pixel_prior))
    pending = None
    losses = []
    for member, (real_features, real_labels) in zip(run.members, reals):
        if member.features is not None:
            real_features = member.features(real_features.to(member.features.shift.device, torch.float32))

        def loss_fn(syn_features: Tensor, copy_labels: Tensor, weight=member.weight, real_features=real_features,
                    real_labels=real_labels, features=member.features) -> Tensor:
            if features is not None:
                syn_features = features(syn_features.float())
            return weight * run.objective.loss(syn_features, copy_labels, real_features, real_labels,
                                               generators["head"])

        loss, backward = member.side.loss(synthetic, augmentations, member.copies_per_pass, loss_fn,
                                          run.ctx.rank, run.ctx.world_size)
        if into_adam:
            pending = backward
        else:
            backward.into_grad()
        losses.append(float(loss) / member.weight)
    loss_value = sum(member.weight * value for member, value in zip(run.members, losses))
    if run.pixel_stats is not None:  # rank 0 only: the ranks' gradients are summed
        prior = run.cfg.pixel_prior * pixel_prior(synthetic.images(), synthetic.labels, run.pixel_stats)
        prior.backward()
        run.last_prior = float(prior.detach())
    any_stop, any_nonfinite = reduce_step(synthetic.parameters(), stop_requested[0], not math.isfinite(loss_value))
    if any_nonfinite and math.isfinite(loss_value):
        loss_value = float("nan")  # another rank saw a non-finite loss: stop with it
    return loss_value, losses, any_stop, pending


def steps(run: Run) -> None:
    """Steps from the start (or the checkpoint) to `cfg.steps`, with checkpoints and interrupts."""
    cfg = run.cfg
    clock = Clock(float(run.metrics[-1]["seconds"]) if run.metrics else 0.0)
    index = run.start_step
    reset_peak_memory(run.ctx.device)
    bar = progress(cfg.steps, f"distill {cfg.method}", "step", disable=cfg.quiet or not run.main,
                   initial=run.start_step)
    # A single process takes Ctrl-C and SIGTERM as KeyboardInterrupt (held only around the update); ranks
    # of a distributed run only flag them and stop together at a step boundary.
    signals = stop_flags() if run.ctx.is_distributed else sigterm_as_ctrl_c()
    states: dict[str, Any] = {}
    drawn = False  # this step's random draws are made, the parameters not yet updated
    try:
        with signals as stop_requested:
            try:
                while index < cfg.steps:
                    run.fit_check_if_due(index, clock)
                    states = run.step_draws()
                    t0 = time.perf_counter()
                    try:
                        loss_value, member_losses, any_stop, pending = step(run, index, stop_requested)
                        drawn = True
                    except KeyboardInterrupt:
                        any_stop = True
                    if any_stop:
                        # Nothing of this step reached the parameters (a growth is a consistent state on its own):
                        # rewind the step's random draws and save the state "after `index` steps".
                        run.rewind(states)
                        _save_on_stop(run, index)
                    if not math.isfinite(loss_value):
                        raise run.nonfinite_loss(loss_value, index)
                    try:
                        with (defer_sigint() if not run.ctx.is_distributed else nullcontext()):
                            run.optimizer_step(index, pending)
                            pending = None
                            index += 1
                            drawn = False
                            record = _record_step(run, index, loss_value, member_losses, t0, clock)
                        run.quick_probe_if_due(index, record, clock, bar, loss_value)
                    except KeyboardInterrupt:
                        _interrupted(run, index)
                    if "probe_top1" not in run.metrics[-1]:
                        bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
                    bar.update(1)
            except DistillInterrupted:
                raise
            except KeyboardInterrupt:
                # Ctrl-C / SIGTERM in the bookkeeping between the guarded parts of a step (progress bar,
                # generator snapshots): the state is that of `index` finished steps once this step's
                # random draws, if made, are rewound.
                if drawn:
                    run.rewind(states)
                _interrupted(run, index)
    finally:
        bar.close()
    if run.last_saved != index:
        save(run, index)


def _record_step(run: Run, index: int, loss_value: float, member_losses: list[float], t0: float,
                 clock: Clock) -> dict[str, Any]:
    """Step `index` (1-based, just applied) into metrics.jsonl, and its checkpoint when one is due."""
    now = time.perf_counter()
    record = {"step": index, "loss": loss_value, "lr": run.lr_at(index - 1), "step_seconds": round(now - t0, 6),
              "seconds": round(clock.seconds(now), 6),
              "peak_memory_mb": round(peak_memory_mb(run.ctx.device), 2)}
    if run.last_prior is not None:
        record["pixel_prior"] = run.last_prior  # not in "loss": the objective's alone, comparable across runs
    if len(run.members) > 1:
        record["loss_by_backbone"] = {m.name: v for m, v in zip(run.members, member_losses)}
    if run.cfg.param == "pyramid":
        record["levels"] = len(run.synthetic.parameters())
    run.metrics.append(record)
    if run.main:
        with run.writes():
            append_metric(run.out / METRICS_FILE, record)
    if index % run.cfg.checkpoint_every == 0 or index == run.cfg.steps:
        save(run, index)
    return record


def _interrupted(run: Run, index: int) -> None:
    """Ctrl-C / SIGTERM in a single process with `index` steps applied: save them, then stop."""
    if index != run.last_saved:
        save(run, index)
    raise DistillInterrupted(index, True, run.out) from None


def _save_on_stop(run: Run, index: int) -> None:
    """Save the checkpoint after a stop request and raise DistillInterrupted on every rank."""
    failure: Exception | None = None
    try:
        save(run, index)
    except Exception as exc:  # noqa: BLE001 - re-raised below, once the other ranks know
        failure = exc
    saved = not any_rank(failure is not None)  # every rank waits until rank 0 has written it
    if failure is not None:
        raise failure
    raise DistillInterrupted(index, saved, run.out)


# ----------------------------------------------------------------------------------------------------
# finish

def finish(run: Run) -> DistillResult:
    """Outputs (every rank holds the same images; rank 0 writes them)."""
    # Adam's moments (2x the synthetic set; the checkpoint holds them) are freed before the outputs copy
    # the images (the last gradient already was, by Run.optimizer_step).
    run.optimizer.state.clear()
    with torch.no_grad():
        images = run.synthetic.images().detach().float().cpu()
    labels = run.synthetic.labels.cpu()
    index = run.metrics[-1]["step"] if run.metrics else run.start_step
    run.config["steps_done"] = index
    losses = [m["loss"] for m in run.metrics if "loss" in m]
    run.config["final_loss"] = losses[-1] if losses else None
    quick_probes = [m for m in run.metrics if "probe_top1" in m]
    if quick_probes:
        run.config["probe"] = {"final_top1": quick_probes[-1]["probe_top1"], "at_step": quick_probes[-1]["step"],
                               "recipe": QUICK_PROBE_NOTE}
    class_names = run.store.class_names
    if run.main:
        with run.writes():
            write_imagefolder(run.out / IMAGES_DIR, images, labels, class_names)
            atomic_write_json(run.out / CONFIG_FILE, run.config)
            save_safetensors(run.out / DISTILLED_FILE, images, labels, class_names, run.config)
            save_grid(run.out / GRID_FILE, images, labels, class_names)
            save_loss_plot(run.out / LOSS_PLOT_FILE, run.metrics,
                           f"{run.cfg.method} {' + '.join(m.name for m in run.members)} ipc={run.cfg.ipc} "
                           f"({run.store.dataset})")
    return DistillResult(out=run.out, images=images, labels=labels, class_names=class_names,
                         losses=[m["loss"] for m in run.metrics if "loss" in m], steps_done=index,
                         resumed_from=run.start_step if run.resumed else None, config=run.config,
                         rank=run.ctx.rank, world_size=run.ctx.world_size)
