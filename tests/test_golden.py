"""The whole pipeline on a tiny store reproduces the committed outputs (tests/golden/pipeline.npz):
store features, LGM/CLP distilled images and losses, evaluation accuracies, baseline picks.

Bit-identical where that is a property of the code: on a machine with the golden file's key (CPU vendor
and model, torch's BLAS / oneDNN build, threads, versions: `machine_key`), and between two runs in one
process. Anywhere else BLAS kernels sum in another order, so each output is compared with the tolerance
of its kind (`TOLERANCES` in make_golden.py, each derived from how the quantity propagates); within
them the test passes, and says which comparison it made."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.golden.make_golden import (GOLDEN, IPC, TOLERANCES, lgm_config, machine_key, output_kind,
                                      pipeline_outputs, read_golden)


def _differences(golden: dict[str, np.ndarray], outputs: dict[str, np.ndarray], n_val: int,
                 bitwise: bool) -> list[str]:
    problems = []
    for key in sorted(golden):
        want, got = golden[key], outputs[key]
        if got.shape != want.shape:
            problems.append(f"{key}: shape {got.shape}, golden {want.shape}")
            continue
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        worst = float(diff.max()) if diff.size else 0.0
        if bitwise:
            if not np.array_equal(got, want):
                problems.append(f"{key} differs bitwise on the golden's machine (max abs diff {worst:.3g})")
            continue
        tol = TOLERANCES[output_kind(key)]
        atol = tol.atol * (100.0 / n_val) if tol.kind == "accuracies" else tol.atol  # val rows -> percent
        bound = atol + tol.rtol * float(np.abs(want).max(initial=0.0))
        if worst > bound:
            problems.append(f"{key} ({tol.kind}): max abs diff {worst:.3g} > {bound:.3g}")
    return problems


def test_tolerances_are_tighter_than_a_change_of_behaviour():
    """The tolerance comparison can fail: a distilled set from one more step, or features scaled by
    1.001, are outside it."""
    _, golden = read_golden()
    n_val = golden["store_val_features"].shape[0]
    nudged = dict(golden)
    nudged["store_train_features"] = golden["store_train_features"] * np.float32(1.001)
    nudged["clp_images"] = golden["clp_images"] + np.float32(0.01)
    nudged["eval_lgm_top1"] = golden["eval_lgm_top1"] + 3 * 100.0 / n_val
    problems = _differences(golden, nudged, n_val, bitwise=False)
    assert [p.split(" ")[0] for p in problems] == ["clp_images", "eval_lgm_top1", "store_train_features"]
    assert _differences(golden, dict(golden), n_val, bitwise=False) == []


def _assert_centroid_picks_are_not_ties(golden: dict[str, np.ndarray], labels: np.ndarray) -> None:
    """Exact equality of the picks is a property only if no class's ipc-th and next-nearest rows tie
    within what the feature tolerance can move their distances to the class mean."""
    feats = golden["store_train_features"][:, 0].astype(np.float64)
    scale = float(np.abs(golden["store_train_features"]).max())
    feature_error = TOLERANCES["features"].rtol * scale
    for c in np.unique(labels):
        members = feats[labels == c]
        dist = np.sort(((members - members.mean(axis=0)) ** 2).sum(axis=1))
        if dist.size <= IPC:
            continue
        # d = |f - m|^2 moves by at most 2 |f - m| |df| with |df| <= sqrt(D) * feature_error, twice over.
        bound = 4 * np.sqrt(dist[IPC]) * np.sqrt(feats.shape[1]) * feature_error
        assert dist[IPC] - dist[IPC - 1] > bound, f"class {c}: centroid picks tie within rounding"


def test_pipeline_outputs_unchanged(tmp_path: Path, capsys):
    golden_key, golden = read_golden()
    outputs = pipeline_outputs(tmp_path)
    here = machine_key()
    assert set(outputs) == set(golden)
    n_val = golden["store_val_features"].shape[0]
    same_machine = here == golden_key
    problems = _differences(golden, outputs, n_val, bitwise=same_machine)
    assert not problems, "\n".join(problems)

    from featurestore.store import FeatureStore
    labels = FeatureStore.open(tmp_path / "fs").split("test-cnn", "train").load().labels.numpy()
    _assert_centroid_picks_are_not_ties(golden, labels)

    # Bit-exactness that holds on any machine: the same run again in this process, same bits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from engine.distill import distill
        again = distill(lgm_config(tmp_path / "again", tmp_path / "fs"))
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(again.images.numpy(), outputs["lgm_images"])
    assert np.array_equal(np.array(again.losses), outputs["lgm_losses"])

    with capsys.disabled():
        if same_machine:
            print(f"\n[golden] bit-identical to {GOLDEN.name} (same machine key)")
        else:
            differs = sorted(k for k in set(here) | set(golden_key) if here.get(k) != golden_key.get(k))
            print(f"\n[golden] {GOLDEN.name} made on another machine (key differs in {', '.join(differs)}): "
                  "compared within each output kind's tolerance")
