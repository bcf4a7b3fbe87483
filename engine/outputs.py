"""What a distillation run leaves in its output directory, besides the ImageFolder set and checkpoint:
`distilled.safetensors`, `grid.png`, `loss.png`, `metrics.jsonl`. Every file is written atomically."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from engine.probe import QUICK_PROBE
from featurestore.runtime import atomic_write_bytes, atomic_write_path

# A page of the grid shows at most this many classes (each with at most GRID_MAX_PER_CLASS images): 100
# labelled tiles stay readable; 1000 would be a poster of unreadable thumbnails.
GRID_MAX_CLASSES = 100
GRID_MAX_PER_CLASS = 10


def save_safetensors(path: str | os.PathLike, images: Tensor, labels: Tensor, class_names: Sequence[str],
                     config: dict[str, Any]) -> None:
    """images float32 [N, 3, H, W] in [0, 1], labels int64 [N]; class names and config in the metadata."""
    from safetensors.torch import save_file

    tensors = {"images": images.detach().float().cpu().contiguous(),
               "labels": labels.detach().to(torch.int64).cpu().contiguous()}
    metadata = {"class_names": json.dumps(list(class_names)), "config": json.dumps(config, sort_keys=True),
                "format": "probe-distill distilled set: images float32 [N,3,H,W] in [0,1], labels int64 [N]"}
    # save_file writes the tensors' memory straight into the file; `save` built the whole file as bytes
    # first, a second copy of the set (at 1000 images of 128 px, the run's peak memory).
    atomic_write_path(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _figure_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def grid_columns(num_classes: int, per_class: int) -> int:
    """How many class groups (each `per_class` images wide) side by side make a near-square grid."""
    cells = num_classes * per_class
    return max(1, min(num_classes, round(math.sqrt(cells) / per_class)))


def grid_pages(classes: Sequence[int]) -> tuple[list[int], list[list[int]]]:
    """(the classes of the overview page, the pages holding every class). Up to GRID_MAX_CLASSES classes:
    one page with all of them. More: the overview samples GRID_MAX_CLASSES classes evenly, and every class
    appears on exactly one of the pages."""
    classes = list(classes)
    if len(classes) <= GRID_MAX_CLASSES:
        return classes, [classes]
    picks = sorted({int(round(x)) for x in torch.linspace(0, len(classes) - 1, GRID_MAX_CLASSES).tolist()})
    pages = [classes[i:i + GRID_MAX_CLASSES] for i in range(0, len(classes), GRID_MAX_CLASSES)]
    return [classes[i] for i in picks], pages


def _render_grid(classes: Sequence[int], per_class_index: dict[int, list[int]], pixels, class_names: Sequence[str],
                 title: str | None):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    width = max(len(per_class_index[c]) for c in classes)
    groups = grid_columns(len(classes), width)
    rows = math.ceil(len(classes) / groups)
    cell = 1.25 if width * groups <= 12 else 1.0
    fig, axes = plt.subplots(rows, groups * width, figsize=(cell * groups * width, (cell + 0.25) * rows),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for slot, c in enumerate(classes):
        r, g = divmod(slot, groups)
        for k, index in enumerate(per_class_index[c]):
            ax = axes[r][g * width + k]
            ax.imshow(pixels[index], interpolation="nearest")
        name = class_names[c]
        label = name if len(name) <= 22 else name[:21] + "…"
        axes[r][g * width].set_title(label, fontsize=7, loc="left", pad=2)
    height = (cell + 0.25) * rows
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.05 / height)
    fig.subplots_adjust(wspace=0.04, hspace=0.35, top=1 - 0.45 / height if title else 0.95)
    return fig


class _GridPixels:
    """pixels[i]: image i as float [H, W, 3] in [0, 1], converted when the grid shows it (a copy of the
    whole set would be 1 P more memory at the end of a large run, for the few images a page shows)."""

    def __init__(self, images: Tensor) -> None:
        self.images = images.detach()

    def __getitem__(self, index: int) -> np.ndarray:
        return self.images[index].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def save_grid(path: str | os.PathLike, images: Tensor, labels: Tensor, class_names: Sequence[str]) -> None:
    """The images as a labelled, near-square grid of classes (each class: its first GRID_MAX_PER_CLASS
    images side by side, its name above). With more than GRID_MAX_CLASSES classes, `path` is an overview of
    classes sampled evenly and `<stem>-pages/page-NNN.png` hold every class."""
    import matplotlib.pyplot as plt

    labels_list = labels.tolist()
    classes = sorted(set(labels_list))
    per_class_index = {c: [] for c in classes}
    for i, v in enumerate(labels_list):
        if len(per_class_index[v]) < GRID_MAX_PER_CLASS:
            per_class_index[v].append(i)
    pixels = _GridPixels(images)
    overview, pages = grid_pages(classes)
    path = Path(path)
    outputs = [(path, overview, None if len(pages) == 1 else
                f"{len(overview)} of {len(classes)} classes (all classes: {path.stem}-pages/)")]
    if len(pages) > 1:
        outputs += [(path.parent / f"{path.stem}-pages" / f"page-{n + 1:03d}.png", page,
                     f"classes {page[0]}..{page[-1]} (page {n + 1} of {len(pages)})") for n, page in enumerate(pages)]
    for target, page_classes, title in outputs:
        fig = _render_grid(page_classes, per_class_index, pixels, class_names, title)
        try:
            atomic_write_bytes(target, _figure_bytes(fig))
        finally:
            plt.close(fig)


def save_loss_plot(path: str | os.PathLike, metrics: Sequence[dict[str, Any]], title: str) -> None:
    """The loss per step (and its moving average); with --eval-every, the quick probe's accuracy beside it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics if "loss" in m]
    losses = [m["loss"] for m in metrics if "loss" in m]
    quick_probes = [(m["step"], m["probe_top1"]) for m in metrics if "probe_top1" in m]
    fig, axes = plt.subplots(1, 2 if quick_probes else 1, figsize=(11 if quick_probes else 6, 3.5), squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, losses, lw=0.8, color="tab:blue", alpha=0.5, label="loss")
    if len(losses) >= 20:
        # A centred moving average: the per-step loss is noisy (a new random head every step).
        window = max(5, len(losses) // 50)
        kernel = torch.ones(window) / window
        smooth = torch.nn.functional.conv1d(torch.tensor(losses, dtype=torch.float32)[None, None],
                                            kernel[None, None], padding=window // 2)[0, 0, :len(losses)]
        ax.plot(steps[window // 2: len(losses) - window // 2],
                smooth[window // 2: len(losses) - window // 2].tolist(), color="tab:blue", lw=1.5,
                label=f"moving average ({window})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if quick_probes:
        ax = axes[0][1]
        ax.plot([s for s, _ in quick_probes], [p for _, p in quick_probes], marker="o", color="tab:green")
        ax.set_xlabel("step")
        ax.set_ylabel("probe top-1 (%)")
        ax.set_title(f"cheap probe on the store's val features ({QUICK_PROBE})", fontsize=9)
        ax.grid(alpha=0.3)
    try:
        atomic_write_bytes(path, _figure_bytes(fig))
    finally:
        plt.close(fig)


def write_metrics(path: str | os.PathLike, metrics: Sequence[dict[str, Any]]) -> None:
    """The whole metrics file at once (used on resume to drop steps after the checkpoint)."""
    atomic_write_bytes(path, "".join(json.dumps(m) + "\n" for m in metrics).encode())


def append_metric(path: str | os.PathLike, metric: dict[str, Any]) -> None:
    with open(Path(path), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(metric) + "\n")
