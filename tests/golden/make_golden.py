"""Regenerate tests/golden/pipeline.npz: the outputs of the whole pipeline on a tiny store for fixed
seeds (store features, LGM and CLP distilled images, evaluation accuracies, baseline picks).

`tests/test_golden.py` recomputes them and asserts they are unchanged: a structural change must leave
every output bit-identical. Rerun this script only for a deliberate change of behaviour, and say so in
the commit message:  python -m tests.golden.make_golden
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

GOLDEN = Path(__file__).with_name("pipeline.npz")


def pipeline_outputs(work: Path) -> dict[str, np.ndarray]:
    """Every output of a tiny run, as numpy arrays (deterministic for a fixed machine). One intra-op
    thread: CPU kernels split reductions by thread count, so the bits would depend on the core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pipeline_outputs(work)
    finally:
        torch.set_num_threads(threads)


def _pipeline_outputs(work: Path) -> dict[str, np.ndarray]:
    from engine.baselines import make_baseline
    from engine.distill import DistillConfig, distill
    from engine.evaluate import evaluate
    from featurestore.build import build
    from featurestore.store import FeatureStore

    torch.manual_seed(0)
    store = work / "fs"
    build("synthetic", "test-cnn", store, limit_per_class=6, dtype="fp32", views=2, workers=0, quiet=True)
    fs = FeatureStore.open(store)
    out: dict[str, np.ndarray] = {}
    for split in ("train", "val"):
        data = fs.split("test-cnn", split).load(view="all")
        out[f"store_{split}_features"] = data.features.numpy()
        out[f"store_{split}_class_mean"] = fs.split("test-cnn", split).class_mean()
    common = dict(store=str(store), backbone="test-cnn", ipc=1, augs=2, quiet=True, device="cpu", seed=3)
    lgm = distill(DistillConfig(out=str(work / "lgm"), steps=8, grow_every=1, chunk=3, checkpoint_every=4, **common))
    out["lgm_images"] = lgm.images.numpy()
    out["lgm_losses"] = np.array(lgm.losses)
    clp = distill(DistillConfig(out=str(work / "clp"), method="clp", steps=7, real_batch="full", **common))
    out["clp_images"] = clp.images.numpy()
    out["clp_losses"] = np.array(clp.losses)
    centroid = make_baseline(store, "test-cnn", "centroid", work / "centroid", device="cpu", quiet=True)
    out["centroid_rows"] = np.array([p["row"] for picks in centroid["picks"].values() for p in picks])
    result = evaluate(store, {"lgm": work / "lgm", "centroid": work / "centroid"}, ["test-cnn"], seeds=2,
                      epochs=20, full=True, full_epochs=3, device="cpu", quiet=True)
    for row, cells in result.rows.items():
        out[f"eval_{row}_top1"] = np.array(cells["test-cnn"].top1)
    return out


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        outputs = pipeline_outputs(Path(tmp))
    np.savez_compressed(GOLDEN, cpu_capability=np.array(torch.backends.cpu.get_cpu_capability()),
                        torch_version=np.array(torch.__version__), **outputs)
    print(f"wrote {GOLDEN} ({', '.join(sorted(outputs))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
