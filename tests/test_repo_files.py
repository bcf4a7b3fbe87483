"""The files a new user reads and runs first: the Makefile targets the README names must parse and exist,
and every module path ARCHITECTURE.md names must exist."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_no_merge_conflict_markers_in_tracked_text_files():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    marker = re.compile(r"^(<{7} |>{7} |={7}$)", re.MULTILINE)
    offenders = []
    for name in tracked.stdout.split():
        path = REPO / name
        if path.suffix in {".png", ".onnx", ".zarr", ".pt"} or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if marker.search(text):
            offenders.append(name)
    assert offenders == []


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_readme_make_targets_exist():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    targets = sorted(set(re.findall(r"`make ([a-z][a-z-]*)`", readme)) | {"demo", "test", "bench"})
    result = subprocess.run(["make", "-n", "--no-print-directory", *targets], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr



_LAYERS = ("featurestore", "engine", "cli")  # the packages ARCHITECTURE.md describes room by room
_ROOTED = re.compile(r"\b(?:featurestore|engine|cli|benchmarks|demo|tests)/[\w./<>-]*")  # engine/real.py
_DOTTED = re.compile(r"(?<![\w/.])(?:featurestore|engine|cli)(?:\.\w+)+")  # featurestore.store
_BARE_MODULE = re.compile(r"(?<![\w/.<>-])[\w-]+\.py\b")  # a module named within its room: views.py


def _named_modules(markdown: str):
    """(line number, name, the paths any one of which makes the name true) for every module path the
    text names. A name with a `<placeholder>` is a pattern, not a path, and is left out. A bare name is
    relative to its section's package (`## engine: ...`), to the folder in the first cell of its table
    row (`| distill/ | config.py ...`) or to a folder an earlier path on its line names; in a section
    about no one package (the data flow, "To add ...") to any layer package."""
    package = None
    for number, line in enumerate(markdown.splitlines(), 1):
        if line.startswith("## "):
            words = line[3:].split(":")[0].split()
            package = words[0] if words and words[0] in _LAYERS else None
        folders = [package] if package else list(_LAYERS)
        first_cell = line.split("|")[1].strip().strip("`") if line.startswith("|") else ""
        if package and first_cell.endswith("/") and "/" not in first_cell[:-1]:
            folders.insert(0, f"{package}/{first_cell[:-1]}")
            yield number, f"{folders[0]}/", [REPO / folders[0]]
        for match in _ROOTED.finditer(line):
            path = match.group(0).rstrip(".")
            folders.append(path.rstrip("/") if path.endswith("/") else path.rsplit("/", 1)[0])
            if "<" not in path:
                yield number, path, [REPO / path]
        for match in _DOTTED.finditer(line):
            # The package and its first member must exist; the rest may name a class or function in it.
            top, member = match.group(0).split(".")[:2]
            if member != "py":
                yield number, match.group(0), [REPO / top / f"{member}.py", REPO / top / member / "__init__.py"]
        for match in _BARE_MODULE.finditer(_ROOTED.sub(" ", line)):
            yield number, match.group(0), [REPO / folder / match.group(0) for folder in folders]


def test_architecture_module_paths_exist():
    """ARCHITECTURE.md is the map a newcomer follows: a module it names that moved or was renamed sends
    them to nothing (issue 22: the map must be exact)."""
    named = list(_named_modules((REPO / "ARCHITECTURE.md").read_text(encoding="utf-8")))
    assert len(named) > 40, "the parser found almost no module names: did ARCHITECTURE.md change format?"
    missing = [f"line {number}: {name}" for number, name, paths in named if not any(p.exists() for p in paths)]
    assert missing == []


def test_architecture_module_check_catches_stale_names():
    stale = ("## featurestore: rooms\n| `backbones.py` | see `featurestore/imgfocus.py`, `featurestore.opennsfw` |\n"
             "| `distill/` | `loop.py` |\n## engine: rooms\n| `distill/` | `loop.py`, `nothere.py` |\n")
    missing = [name for _, name, paths in _named_modules(stale) if not any(p.exists() for p in paths)]
    assert missing == ["featurestore/imgfocus.py", "featurestore.opennsfw", "backbones.py", "featurestore/distill/",
                       "loop.py", "nothere.py"]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_demo_and_demo_full_targets_run_the_one_demo_script():
    """`make demo` is the headline and `make demo-full` the same script with --full (no second pipeline)."""
    result = subprocess.run(["make", "-n", "--no-print-directory", "demo", "demo-full"], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if "demo.run" in line]
    assert [line.split("-m demo.run")[1].strip() for line in commands] == ["", "--full"]
