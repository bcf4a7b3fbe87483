"""Loader `timm`: a timm model with the pretrained weights of its Hugging Face hub tag (from the local
cache, or downloaded once), or with a local checkpoint given as --weights."""

from __future__ import annotations

from pathlib import Path

from ..errors import BackboneError, one_line
from .loader import ERROR_LIMIT, LoadedModel, Loader, hf_cached_file, missing_weights
from .spec import BackboneSpec


class TimmLoader(Loader):
    name = "timm"

    def load(self, spec: BackboneSpec, image_size: int, weights: str | None) -> LoadedModel:
        import timm

        if weights is not None:
            return load_timm_file(spec, image_size, weights)
        try:
            # The hub configs of these tags have num_classes=0, so timm loads them strictly.
            model = timm.create_model(spec.architecture, pretrained=True, num_classes=0, img_size=image_size)
        except Exception as exc:  # hub errors come in many types (offline, 404, connection): one message
            raise missing_weights(spec, f"{spec.hub_id or spec.architecture}: {type(exc).__name__}") from exc
        return LoadedModel(model, model, None)

    def weights_status(self, spec: BackboneSpec) -> tuple[bool, str]:
        hit = hf_cached_file(spec.hub_id, ("model.safetensors", "pytorch_model.bin"))
        return (True, hit) if hit else (False, f"HF hub {spec.hub_id} (not in cache; or --weights PATH)")


def load_timm_file(spec: BackboneSpec, image_size: int, weights: str) -> LoadedModel:
    """timm model from a local checkpoint, loaded strictly.

    Applies the same checkpoint filter timm applies to hub weights (format conversion, e.g. the DINOv2
    authors' .pth, and position-embedding resampling to `image_size`), so a file holding the hub
    checkpoint gives exactly the hub model. timm's own file loading turns non-strict whenever the
    model's and the pretrained config's class counts differ (num_classes=0 vs 1000 for a plain
    ViT-B/16), which would let a checkpoint with unexpected key names load nothing, silently.
    """
    import sys

    import timm
    from timm.models import load_state_dict

    path = Path(weights)
    if not path.is_file():
        raise missing_weights(spec, f"--weights {weights}: no such file")
    model = timm.create_model(spec.architecture, pretrained=False, num_classes=0, img_size=image_size)
    try:
        state = load_state_dict(str(path), weights_only=True)  # unwraps 'state_dict'/'model', strips 'module.'
    except Exception as exc:  # noqa: BLE001 - torch/safetensors raise many types for a bad file
        raise BackboneError(f"could not read --weights {weights} for backbone '{spec.name}' "
                            f"({one_line(exc, ERROR_LIMIT)}); expected a state dict (.pth/.bin/.safetensors)") from exc
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as exc:  # noqa: BLE001 - the filter indexes keys/shapes a foreign file may lack
            raise BackboneError(f"--weights {weights} does not match backbone '{spec.name}' "
                                f"(timm {spec.architecture}): {one_line(exc, ERROR_LIMIT)}") from exc
    classifiers = model.pretrained_cfg.get("classifier") or ()
    for name in [classifiers] if isinstance(classifiers, str) else classifiers:
        # The embedding is the pre-classifier feature: a linear-eval head in the file is not used.
        state.pop(f"{name}.weight", None)
        state.pop(f"{name}.bias", None)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise BackboneError(
            f"--weights {weights} does not match backbone '{spec.name}' (timm {spec.architecture}): "
            f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:3]})")
    return LoadedModel(model, model, str(path))


LOADER = TimmLoader()
