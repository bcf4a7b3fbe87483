"""Randomness of a run: one `seed` drives everything through four CPU generators with derived seeds
(`init`: synthetic init and pyramid growth noise; `head`: the random heads; `augment`: synthetic
augmentation; `real`: real-batch rows, views and real augmentation). Their states are checkpointed, so
a resumed run continues bit for bit on the same device."""

from __future__ import annotations

import numpy as np
import torch

GENERATORS = ("init", "head", "augment", "real")


def derived_seed(seed: int, name: str) -> int:
    """A 63-bit seed per generator name, derived from the run seed (numpy's SeedSequence)."""
    entropy = [int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF, GENERATORS.index(name)]
    return int(np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32).astype(np.uint64)
               .dot(np.array([1, 1 << 32], dtype=np.uint64)) & np.uint64((1 << 63) - 1))


def make_generators(seed: int) -> dict[str, torch.Generator]:
    return {name: torch.Generator().manual_seed(derived_seed(seed, name)) for name in GENERATORS}
