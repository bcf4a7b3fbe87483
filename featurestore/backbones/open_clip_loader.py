"""Loader `open_clip`: the image tower of an open_clip model, with the weights of its pretrained tag
(from the local Hugging Face cache, or downloaded once) or of a local checkpoint given as --weights."""

from __future__ import annotations

from pathlib import Path

from ..errors import BackboneError, one_line
from .loader import ERROR_LIMIT, LoadedModel, Loader, hf_cached_file, missing_weights
from .spec import BackboneSpec


class OpenClipLoader(Loader):
    name = "open_clip"

    def load(self, spec: BackboneSpec, image_size: int, weights: str | None) -> LoadedModel:
        import open_clip

        if weights is not None and not Path(weights).is_file():
            raise missing_weights(spec, f"--weights {weights}: no such file")
        pretrained = weights or spec.hub_id
        try:
            model = open_clip.create_model(spec.architecture, pretrained=pretrained,
                                           force_image_size=image_size if image_size != spec.image_size else None)
        except Exception as exc:  # noqa: BLE001 - hub and checkpoint errors come in many types
            if weights is not None:
                raise BackboneError(f"could not load --weights {weights} into open_clip {spec.architecture} "
                                    f"(backbone '{spec.name}'): {one_line(exc, ERROR_LIMIT)}") from exc
            raise missing_weights(spec, f"open_clip {spec.architecture} pretrained={pretrained}: "
                                        f"{type(exc).__name__}") from exc
        # encode_image(x) is visual(x); keeping only the image tower halves memory and the fingerprint
        # then covers exactly the weights that produce the features.
        return LoadedModel(model.visual, model.visual, weights)

    def weights_status(self, spec: BackboneSpec) -> tuple[bool, str]:
        import open_clip

        cfg = open_clip.get_pretrained_cfg(spec.architecture, spec.hub_id)
        hub = (cfg.get("hf_hub") or "").strip("/")
        if hub:
            hit = hf_cached_file(hub, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
            return (True, hit) if hit else (False, f"HF hub {hub} (not in cache; or --weights PATH)")
        return False, f"open_clip {spec.hub_id} (not in cache; or --weights PATH)"


LOADER = OpenClipLoader()
