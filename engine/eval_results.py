"""The results of `engine eval` and their files: per-cell accuracies (`CellResult`), the table of image
sets by backbones with its "unseen backbones" column (`EvalResult`), and `eval.json` / `eval.md`
written atomically to a checked --out."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featurestore.errors import UserError
from featurestore.runtime import atomic_write_bytes, atomic_write_json, require_writable, write_errors

FULL_ROW = "full"
UNSEEN_COLUMN = "mean over unseen backbones"


@dataclass
class CellResult:
    """One (image set, backbone) cell: per-seed accuracies in percent."""

    seeds: list[int]
    top1: list[float]
    top5: list[float]
    num_images: int

    @property
    def top1_mean(self) -> float:
        return float(np.mean(self.top1))

    @property
    def top1_std(self) -> float:
        return float(np.std(self.top1))

    @property
    def top5_mean(self) -> float:
        return float(np.mean(self.top5))

    @property
    def top5_std(self) -> float:
        return float(np.std(self.top5))

    def to_json(self) -> dict:
        return {"seeds": self.seeds, "top1": self.top1, "top5": self.top5, "num_images": self.num_images,
                "top1_mean": self.top1_mean, "top1_std": self.top1_std,
                "top5_mean": self.top5_mean, "top5_std": self.top5_std}


def _md_text(text: str) -> str:
    """Control characters (a newline in a folder name) as \\xNN: one table row or list item per line."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", text)


def _md_cell(text: str) -> str:
    """A markdown table cell: control characters escaped, '|' escaped."""
    return _md_text(text).replace("|", "\\|")


@dataclass
class EvalResult:
    """rows[set name][backbone] -> CellResult; `config` records everything needed to reproduce."""

    backbones: list[str]
    rows: dict[str, dict[str, CellResult]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    # The backbones each set was made with (distilled on, or ranked by for centroid/neighbors baselines);
    # the others are "unseen" for it. Unknown sets (a plain folder) and random real images: none.
    sources: dict[str, list[str]] = field(default_factory=dict)

    def unseen_mean(self, row: str, metric: str = "top1") -> float | None:
        """Mean over the evaluation backbones the set was not made with (None: no such cell)."""
        if row == FULL_ROW or len(self.backbones) < 2:
            return None
        seen = set(self.sources.get(row, []))
        cells = [cell for b, cell in self.rows.get(row, {}).items() if b not in seen]
        if not cells:
            return None
        return float(np.mean([c.top1_mean if metric == "top1" else c.top5_mean for c in cells]))

    def cell_text(self, row: str, backbone: str, metric: str = "top1") -> str:
        cell = self.rows.get(row, {}).get(backbone)
        if cell is None:
            return "-"
        mean, std = (cell.top1_mean, cell.top1_std) if metric == "top1" else (cell.top5_mean, cell.top5_std)
        return f"{mean:.1f} ± {std:.1f}"

    def table(self, metric: str = "top1") -> tuple[list[str], list[list[str]]]:
        """(header, rows) of the table: rows are image sets, columns backbones, cells 'mean ± std'; with
        several backbones a last column, the mean over the backbones each set was not made with."""
        header = ["set"] + self.backbones
        cross = len(self.backbones) > 1
        if cross:
            header.append(UNSEEN_COLUMN)
        rows = []
        for row in self.rows:
            cells = [row] + [self.cell_text(row, b, metric) for b in self.backbones]
            if cross:
                unseen = self.unseen_mean(row, metric)
                cells.append("-" if unseen is None else f"{unseen:.1f}")
            rows.append(cells)
        return header, rows

    def to_markdown(self) -> str:
        parts = []
        for metric in ("top1", "top5"):
            header, rows = self.table(metric)
            lines = [f"### {metric.replace('top', 'top-')} accuracy (%), mean ± std over seeds", "",
                     "| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
            parts.append("\n".join(lines))
        cfg = self.config
        notes = [f"- store: `{cfg.get('store')}` ({cfg.get('dataset')}, {cfg.get('num_classes')} classes)",
                 f"- seeds: {cfg.get('seeds')}; probe: {cfg.get('protocol')}"]
        for name, path in cfg.get("image_sets", {}).items():
            made = ", ".join(self.sources.get(name, [])) or "no backbone (or unknown)"
            notes.append(f"- `{_md_text(name)}`: `{_md_text(str(path))}` ({cfg.get('images_per_set', {}).get(name)} "
                         f"images; made with {made})")
        if len(self.backbones) > 1:
            notes.append(f"- `{UNSEEN_COLUMN}`: mean top-1 over the evaluation backbones a set was not made with")
        if cfg.get("full"):
            full = cfg["full"]
            notes.append(f"- `{FULL_ROW}`: probe on all stored train features (view 0), bs {full['batch_size']}, "
                         f"{full['epochs']} epochs, same optimizer")
        return "# Linear-probe evaluation\n\n" + "\n\n".join(parts) + "\n\n" + "\n".join(notes) + "\n"

    def to_json(self) -> dict:
        return {"backbones": self.backbones, "config": self.config, "sources": self.sources,
                "results": {row: {b: cell.to_json() for b, cell in cells.items()} for row, cells in self.rows.items()},
                "mean_over_unseen_backbones": {row: self.unseen_mean(row) for row in self.rows}}


def write_eval_outputs(result: EvalResult, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write `eval.json` (everything) and `eval.md` (the tables) atomically; returns their paths."""
    out = check_eval_out(out_dir)
    json_path, md_path = out / "eval.json", out / "eval.md"
    with write_errors(f"the evaluation to {out}", "rerun with another --out (the table above is the result)"):
        atomic_write_json(json_path, result.to_json())
        atomic_write_bytes(md_path, result.to_markdown().encode())
    return json_path, md_path


def check_eval_out(out_dir: str | os.PathLike) -> Path:
    """Refuse (one line) an --out that is a file or cannot be written: checked before the evaluation, so a
    bad --out costs a second, not the evaluation's minutes."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose another path")
    require_writable(out)
    return out
