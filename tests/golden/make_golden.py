"""Regenerate tests/golden/pipeline.npz: the outputs of the whole pipeline on a tiny store for fixed
seeds (store features, LGM and CLP distilled images and losses, evaluation accuracies, baseline picks),
with the key of the machine that made them (`machine_key`).

`tests/test_golden.py` recomputes them. On the machine the file was made on (the same key) every output
must be bit-identical; anywhere else each output is compared with the tolerance of its kind
(`TOLERANCES`), because MKL / oneDNN / OpenBLAS pick kernels by CPU vendor and model and so sum in
another order. Rerun this script only for a deliberate change of behaviour, and say so in the commit
message:  python -m tests.golden.make_golden
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

GOLDEN = Path(__file__).with_name("pipeline.npz")
KEY_FIELD = "machine_key"

# One intra-op thread: CPU kernels split reductions by thread count, so the bits would depend on the
# core count. Recorded in the key.
PIPELINE_THREADS = 1

# The pipeline's distillation settings, which the image tolerance is derived from.
LGM_STEPS = 8
CLP_STEPS = 7
IPC = 1


def _cpu_model() -> tuple[str, str]:
    """(vendor, model name) of the CPU: what MKL / oneDNN choose their kernels by."""
    vendor = model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            name, _, value = line.partition(":")
            name = name.strip()
            if name in ("vendor_id", "CPU implementer") and not vendor:
                vendor = value.strip()
            elif name in ("model name", "CPU part") and not model:
                model = value.strip()
    except OSError:  # not Linux: the platform's own words
        pass
    return vendor or platform.system(), model or platform.processor() or platform.machine()


def machine_key() -> dict[str, str]:
    """Everything that decides the floating-point order of the pipeline on a CPU: the CPU (vendor,
    model, instruction set torch dispatches to), torch's BLAS / oneDNN build, the thread count, and
    the versions of torch, numpy and faiss (the centroid baseline). Two machines with equal keys run
    the same kernels in the same order, so their outputs are bit-identical."""
    import faiss

    vendor, model = _cpu_model()
    return {
        "cpu_vendor": vendor,
        "cpu_model": model,
        "arch": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_version": torch.__version__,
        # The build description names the MKL / oneDNN versions, BLAS_INFO and the build flags.
        "torch_build": hashlib.sha256(torch.__config__.show().encode()).hexdigest()[:16],
        "mkldnn": f"available={torch.backends.mkldnn.is_available()} enabled={torch.backends.mkldnn.enabled}",
        "threads": str(PIPELINE_THREADS),
        "numpy_version": np.__version__,
        "faiss_version": getattr(faiss, "__version__", "?"),
    }


@dataclass(frozen=True)
class Tolerance:
    """|got - want| <= atol + rtol * max|want| elementwise (the scale is the array's, so an element near
    zero is held to the array's rounding level, not its own), or a whole-unit count for discrete
    outputs."""
    kind: str
    rtol: float
    atol: float = 0.0
    why: str = ""


_EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7
# Adam moves each parameter by about lr per step whatever the gradient's size, so a gradient
# coordinate that is zero up to rounding can step either way: the images' difference between two
# summation orders grows with (steps x lr), the reach of the optimizer. lr is at most 0.05 (--lr auto).
_IMAGE_REACH = 0.05 * max(LGM_STEPS, CLP_STEPS)

TOLERANCES: dict[str, Tolerance] = {
    "features": Tolerance(
        "features", rtol=64 * _EPS32,
        why="one forward pass of a small fp32 backbone: each output a sum of a few hundred products, "
            "rounding of ~sqrt(terms) ulp per layer over a few layers, so 64 ulp of the array's scale"),
    "images": Tolerance(
        "images", rtol=0.0, atol=0.01 * _IMAGE_REACH,
        why="after N Adam steps: 1% of the optimizer's reach (steps x lr), a few coordinates whose "
            "gradient is at the rounding level take the other sign; still well under one 8-bit level "
            "of the PNGs a run writes (1/255) and far under any change of behaviour"),
    "losses": Tolerance(
        "losses", rtol=1e-5,
        why="the loss of images that differ at the image tolerance: a smooth function, its change "
            "second order around the optimizer's path; 1e-5 of its scale (~80 ulp)"),
    "accuracies": Tolerance(
        "accuracies", rtol=0.0, atol=2.0,
        why="top-1 over the val rows: a prediction flips only for a row whose logit margin is within "
            "the propagated error; allow two of them (in val rows, converted to percent by the test)"),
    "picks": Tolerance(
        "picks", rtol=0.0,
        why="nearest rows to a class mean: equal unless two candidates' distances tie within the "
            "feature tolerance (the test checks the golden's margins)"),
}


def output_kind(key: str) -> str:
    """Which tolerance an output of `pipeline_outputs` is compared with off the golden's machine."""
    if key.startswith("store_"):
        return "features"
    if key.endswith("_images"):
        return "images"
    if key.endswith("_losses"):
        return "losses"
    if key.startswith("eval_") and key.endswith("_top1"):
        return "accuracies"
    if key.endswith("_rows"):
        return "picks"
    raise KeyError(f"no tolerance kind for golden output {key!r}: add it to output_kind")


def pipeline_outputs(work: Path) -> dict[str, np.ndarray]:
    """Every output of a tiny run, as numpy arrays (deterministic for a fixed machine key)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(PIPELINE_THREADS)
    try:
        return _pipeline_outputs(work)
    finally:
        torch.set_num_threads(threads)


def lgm_config(work: Path, store: Path):
    """The pipeline's LGM run (also rerun alone by the same-process bit-exactness test)."""
    from engine.distill import DistillConfig
    return DistillConfig(out=str(work / "lgm"), steps=LGM_STEPS, grow_every=1, chunk=3, checkpoint_every=4,
                         **_common(store))


def _common(store: Path) -> dict:
    return dict(store=str(store), backbone="test-cnn", ipc=IPC, augs=2, quiet=True, device="cpu", seed=3)


def _pipeline_outputs(work: Path) -> dict[str, np.ndarray]:
    from engine.baselines import make_baseline
    from engine.distill import DistillConfig, distill
    from engine.evaluate import evaluate
    from featurestore.build import build
    from featurestore.store import FeatureStore

    torch.manual_seed(0)
    store = work / "fs"
    build("gratings", "test-cnn", store, limit_per_class=6, dtype="fp32", views=2, workers=0, quiet=True)
    fs = FeatureStore.open(store)
    out: dict[str, np.ndarray] = {}
    for split in ("train", "val"):
        data = fs.split("test-cnn", split).load(view="all")
        out[f"store_{split}_features"] = data.features.numpy()
        out[f"store_{split}_class_mean"] = fs.split("test-cnn", split).class_mean()
    lgm = distill(lgm_config(work, store))
    out["lgm_images"] = lgm.images.numpy()
    out["lgm_losses"] = np.array(lgm.losses)
    clp = distill(DistillConfig(out=str(work / "clp"), method="clp", steps=CLP_STEPS, real_batch="full",
                                **_common(store)))
    out["clp_images"] = clp.images.numpy()
    out["clp_losses"] = np.array(clp.losses)
    centroid = make_baseline(store, "test-cnn", "centroid", work / "centroid", device="cpu", quiet=True)
    out["centroid_rows"] = np.array([p["row"] for picks in centroid["picks"].values() for p in picks])
    result = evaluate(store, {"lgm": work / "lgm", "centroid": work / "centroid"}, ["test-cnn"], seeds=2,
                      epochs=20, full=True, full_epochs=3, device="cpu", quiet=True)
    for row, cells in result.rows.items():
        out[f"eval_{row}_top1"] = np.array(cells["test-cnn"].top1)
    return out


def read_golden(path: Path = GOLDEN) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """(machine key, outputs) of a golden file."""
    with np.load(path) as npz:
        key = json.loads(str(npz[KEY_FIELD]))
        outputs = {name: npz[name] for name in npz.files if name != KEY_FIELD}
    return key, outputs


def write_golden(key: dict[str, str], outputs: dict[str, np.ndarray], path: Path = GOLDEN) -> None:
    np.savez_compressed(path, **{KEY_FIELD: np.array(json.dumps(key, sort_keys=True))}, **outputs)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        outputs = pipeline_outputs(Path(tmp))
    write_golden(machine_key(), outputs)
    print(f"wrote {GOLDEN} ({', '.join(sorted(outputs))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
