"""What a loader is: the one object that knows how the backbones of one kind are built and where
their weights come from, so building a backbone (`create_backbone`) and reporting whether its weights
are present (`fs backbones`) can never disagree about a kind. `BackboneSpec.loader` names it; the
loader of kind `x` lives in `x_loader.py` beside this module and is listed in `factory.LOADERS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..errors import BackboneError
from .spec import BackboneSpec

ERROR_LIMIT = 300  # characters of a quoted load error (torch's span many lines)


class LoadedModel(NamedTuple):
    """What a loader hands to `Backbone`."""

    model: nn.Module  # the module whose state dict the fingerprint covers
    embed: Callable[[torch.Tensor], torch.Tensor]  # normalized images [B, 3, S, S] -> [B, D]
    weights_path: str | None  # the file the weights were read from (None: hub cache or random init)


class Loader(ABC):
    """Builds the model of a spec and says, without building it, whether its weights are here."""

    name: str  # the `BackboneSpec.loader` value that selects this loader

    @abstractmethod
    def load(self, spec: BackboneSpec, image_size: int, weights: str | None) -> LoadedModel:
        """The model at `image_size` px with its weights (from `weights`, a local file, when given);
        BackboneError with a one-line message if they cannot be found or do not fit."""

    @abstractmethod
    def weights_status(self, spec: BackboneSpec) -> tuple[bool, str]:
        """(present, where) for `fs backbones`. Must never download: it only looks at installed
        packages and the local Hugging Face cache."""


def missing_weights(spec: BackboneSpec, detail: str) -> BackboneError:
    """The error for hub weights that are neither cached nor given as a file."""
    return BackboneError(
        f"weights for backbone '{spec.name}' not found ({detail}). Provide them with --weights FILE, "
        f"or download once with network access (they are cached under ~/.cache/huggingface); "
        f"on clusters pre-fill the cache and set HF_HUB_OFFLINE=1")


def hf_cached_file(repo_id: str, filenames: tuple[str, ...]) -> str | None:
    """Path of the first of `filenames` in the local Hugging Face cache of `repo_id`, or None."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        hit = try_to_load_from_cache(repo_id, filename)
        if isinstance(hit, str):
            return hit
    return None
