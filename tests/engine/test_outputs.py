"""engine.outputs: the grid of a distilled set is near square and paged."""

from __future__ import annotations

import torch
from PIL import Image

from engine.outputs import GRID_MAX_CLASSES, grid_columns, grid_pages, save_grid


def test_grids_are_near_square_and_paged(tmp_path):
    """Before: one image per class made a single tall column, and only the first 50 classes were shown."""
    assert grid_columns(10, 1) == 3 and grid_columns(10, 10) == 1 and grid_columns(100, 1) == 10
    overview, pages = grid_pages(list(range(250)))
    assert len(overview) == GRID_MAX_CLASSES and overview[0] == 0 and overview[-1] == 249
    assert [c for page in pages for c in page] == list(range(250)) and all(len(p) <= GRID_MAX_CLASSES for p in pages)
    path = tmp_path / "grid.png"
    save_grid(path, torch.rand(10, 3, 16, 16), torch.arange(10), [f"class {i}" for i in range(10)])
    width, height = Image.open(path).size
    assert 0.5 < width / height < 2.0
    save_grid(tmp_path / "big.png", torch.rand(120, 3, 8, 8), torch.arange(120), [str(i) for i in range(120)])
    assert sorted(p.name for p in (tmp_path / "big-pages").iterdir()) == ["page-001.png", "page-002.png"]
