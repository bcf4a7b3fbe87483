"""Memory of a distillation run: the estimate that refuses impossible runs before anything is allocated,
and the peak measured during a run (recorded per step in metrics.jsonl)."""

from __future__ import annotations

from typing import Sequence

import torch

from engine.distill.adam import updates_image_by_image
from engine.distill.config import DistillConfig, DistillError
from featurestore.runtime import free_memory


def bytes_per_synthetic_value(holds_gradient: bool) -> float:
    """Bytes per synthetic pixel value while optimizing: the parameters (a pyramid holds ~4/3 of the pixels)
    and Adam's two moments, float32, plus their gradient when a step holds one (several backbones, ranks or
    the pixel prior: engine.distill.adam.updates_image_by_image), plus one decoded copy of the set and a
    buffer of its decode (2 x 4 bytes: the set-fit check, the outputs; a step decodes pass by pass,
    engine.distill.backprop). An estimate, to refuse impossible runs up front: the worst case of the
    parameterizations, so that no run starts that cannot finish."""
    return 4 / 3 * 4 * (4 if holds_gradient else 3) + 2 * 4


# Per augmented copy and step, whatever --chunk does: its features and their gradient (float32 [D] each,
# for every backbone) and its augmentation parameters (an affine grid's 2x3 matrix, flags, seeds).
_BYTES_PER_COPY_PARAMS = 64


def check_memory(cfg: DistillConfig, num_classes: int, resolution: int, device: torch.device,
                 dims: Sequence[int], distributed: bool = False) -> None:
    """Refuse (one line) a synthetic set, or a number of augmented copies per step, that cannot fit in
    memory, before allocating any of it. `dims`: the feature size of each backbone; `distributed`: whether
    the run has several ranks."""
    values = num_classes * cfg.ipc * 3 * resolution * resolution
    holds_gradient = not updates_image_by_image(len(dims), distributed, bool(cfg.pixel_prior))
    need = int(values * bytes_per_synthetic_value(holds_gradient))
    have = free_memory(device)
    where = "the GPU" if device.type == "cuda" else "this machine"
    if need > have:
        raise DistillError(f"--ipc {cfg.ipc} x {num_classes} classes at {resolution} px needs about "
                           f"{need / 2**30:.1f} GiB for the synthetic images and their optimizer state, and "
                           f"{where} has {have / 2**30:.1f} GiB free: lower --ipc")
    copies = num_classes * cfg.ipc * cfg.augs
    copies_need = copies * (2 * 4 * sum(dims) + _BYTES_PER_COPY_PARAMS)
    if need + copies_need > have:
        raise DistillError(f"--augs {cfg.augs} x --ipc {cfg.ipc} x {num_classes} classes = {copies} augmented "
                           f"copies per step need about {copies_need / 2**30:.1f} GiB for their features and "
                           f"augmentation parameters (besides {need / 2**30:.1f} GiB for the images), and {where} "
                           f"has {have / 2**30:.1f} GiB free: lower --augs (or --ipc)")


def reset_peak_memory(device: torch.device) -> bool:
    """Start the peak-memory count at this run, so a run's peak is its own even when the process made
    other runs before (a notebook, a benchmark, the demo). On a CPU under Linux, writing 5 to
    /proc/self/clear_refs resets the process's RSS high-water mark (VmHWM); where that is not allowed the
    peak stays the process's (said in `peak_memory_mb`). Returns whether the count starts here."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


def _proc_status_kib(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in KiB; None where /proc is missing."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_memory_mb(device: torch.device) -> float:
    """Memory in use now: CUDA allocated, or on a CPU the resident set (VmRSS); what a peak is measured
    above when the memory of one piece of code is wanted (the benchmarks)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib / 1024
    import psutil  # pragma: no cover - no /proc

    return psutil.Process().memory_info().rss / 2**20


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since `reset_peak_memory`: CUDA max allocated, or on a CPU the RSS high-water mark
    (VmHWM; ru_maxrss, the process's peak since it started, where /proc is missing)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib / 1024
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:  # pragma: no cover - Windows
        import psutil

        return psutil.Process().memory_info().rss / 2**20
