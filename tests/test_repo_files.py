"""The files a new user runs first: the Makefile targets the README names must parse and exist."""

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
