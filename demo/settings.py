"""What a demo is: its backbones, its runs and their step budgets, its folder, and for one invocation the
`Demo` every stage reads and the `StageTimes` they record (demo/run.py runs the stages, demo/report.py
writes the report)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
BACKBONES = ("efficientnet-lite0", "dinov2-vits14-imgfocus")
DISTILL_BACKBONE = "efficientnet-lite0"
# (name, method, distillation backbones). The headline: both methods with the defaults on one backbone.
HEADLINE_RUNS = (("LGM", "lgm", (DISTILL_BACKBONE,)), ("CLP", "clp", (DISTILL_BACKBONE,)))
# demo-full only: a set for both backbones at once costs ~4x a single-backbone run on a CPU.
FULL_ONLY_RUNS = (("LGM both", "lgm", BACKBONES),)
CURVE_EVERY = 50  # demo-full: steps between the cheap probes drawn as curves (each probe costs seconds)
# Distillation steps (the authors: 5000). The demo's 300 keep `make demo` within 15 min on 2 busy CPU cores
# (accuracy against steps: benchmarks/results/bench_quality.md); demo-full runs the 400 of bench_quality's
# reference runs.
DEMO_STEPS, FULL_STEPS = 300, 400
BASELINE_KINDS = ("centroid", "random")


def mode_name(args: argparse.Namespace) -> str:
    return "demo-full" if args.full else "demo"


def distill_runs(args: argparse.Namespace) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    return HEADLINE_RUNS + (FULL_ONLY_RUNS if args.full else ())


class StageTimes:
    """The wall seconds of each stage, kept in WORK/stage_seconds.json when the stage computed something:
    a rerun that reuses a stage still reports what it cost (the 'time from a fresh clone')."""

    def __init__(self, work: Path) -> None:
        self.path = work / "stage_seconds.json"
        self.recorded: dict[str, float] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.rows: list[tuple[str, float | None, bool]] = []  # (stage, seconds, computed by this run)

    def add(self, key: str, label: str, seconds: float, computed: bool) -> None:
        if computed:
            self.recorded[key] = round(seconds, 1)
            self.path.write_text(json.dumps(self.recorded, indent=2) + "\n")
        self.rows.append((label, self.recorded.get(key), computed))

    def total(self) -> float:
        return sum(seconds or 0.0 for _, seconds, _ in self.rows)


@dataclasses.dataclass(frozen=True)
class Demo:
    """What every stage of one invocation reads: the options, the mode, its folders, the dataset and store."""

    args: argparse.Namespace
    mode: str
    work: Path
    mode_dir: Path  # what depends on the mode; the store and the baselines are shared
    times: StageTimes
    dataset: str
    store: Path
    split_limits: dict[str, int]
