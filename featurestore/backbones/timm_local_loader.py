"""Loader `timm_local`: a timm model whose weights have no public hub tag (MoCo-v3), so only a local
checkpoint given as --weights can provide them."""

from __future__ import annotations

from ..errors import BackboneError
from .loader import LoadedModel, Loader
from .spec import BackboneSpec
from .timm_loader import load_timm_file


class LocalTimmLoader(Loader):
    name = "timm_local"

    def load(self, spec: BackboneSpec, image_size: int, weights: str | None) -> LoadedModel:
        if weights is None:
            raise BackboneError(
                f"backbone '{spec.name}' has no public hub weights: pass --weights PATH to a timm-style "
                f"{spec.architecture} state dict (e.g. the MoCo-v3 ViT-B/16 linear-eval checkpoint converted to timm keys)")
        return load_timm_file(spec, image_size, weights)

    def weights_status(self, spec: BackboneSpec) -> tuple[bool, str]:
        return False, "local file only: --weights PATH"


LOADER = LocalTimmLoader()
