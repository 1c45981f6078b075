"""m4r verify in bounded memory: users go through in batches of at most SCORE_BUDGET / n_items,
and the merged metrics equal those of one comparison over every user."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from m4r_export.checkpoint import save_checkpoint
from m4r_export.verify import batches, run_verify
from m4r_export.verify import verify as vf
from m4r_export.verify.runners import TorchRunner
from m4r_export.verify.testing import tiny_model, trace_onnx
from m4r_export.verify.verify import VerifyInputs, compare_batch, compare_outputs

N_ITEMS = 300


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vb")
    model = tiny_model(N_ITEMS)
    save_checkpoint(root / "model.pt", model, None, {"max_seq_len": 12})
    return {"ckpt": root / "model.pt", "topk": trace_onnx(model, root / "topk", head="topk", k=10)}


def test_reference_never_scores_more_than_the_budget(
    tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batches, "SCORE_BUDGET", 7 * N_ITEMS)
    seen: list[int] = []
    original = TorchRunner.run

    def spy(self: TorchRunner, item_seq: Any, *args: Any) -> dict[str, np.ndarray]:
        seen.append(len(item_seq))
        return original(self, item_seq, *args)

    monkeypatch.setattr(TorchRunner, "run", spy)
    report = run_verify(tiny["ckpt"], tiny["topk"], users=40, k=5, batch_size=256)
    assert report.passed
    assert sum(seen) == 40 and max(seen) == 7  # 40 users in batches of 7, not one of 256
    assert report.results[0].metrics["users"] == 40


def test_merged_batches_equal_one_comparison() -> None:
    """Errors, counts, worst user and ranking metrics merge exactly across batches of any size."""
    rng = np.random.default_rng(0)
    users, n = 23, 50
    ref = rng.normal(size=(users, n))
    ref[:, 0] = -np.inf
    out = ref + rng.normal(scale=1e-3, size=ref.shape)
    out[17, 3] += 0.5  # the worst user is in a later batch
    out[4, 9] = np.nan
    out[8, 0] = 1.0  # a mask mismatch
    targets = rng.integers(1, n, size=users)
    inputs = VerifyInputs(np.ones((users, 3), np.int64), np.full(users, 3), targets, "test")
    art = vf.ArtifactInfo(Path("model.onnx"), "onnx", "scores", 10, False, None, "fp32")
    whole, overlap = compare_outputs(art, ref, {"scores": out}, 10, inputs)
    for rows in (1, 5, 22):
        parts = [
            compare_batch(
                art, ref[i : i + rows], {"scores": out[i : i + rows]}, 10, inputs.rows(slice(i, i + rows))
            )
            for i in range(0, users, rows)
        ]
        merged, merged_overlap = batches.merge(parts, targets)
        assert merged.keys() == whole.keys()
        for key, value in whole.items():
            assert merged[key] == pytest.approx(value, rel=1e-12, nan_ok=True), (rows, key)
        np.testing.assert_array_equal(merged_overlap, overlap)
    assert whole["worst_user_abs_error"] == 17 and whole["nan"] == 1 and whole["mask_mismatches"] == 1


def test_score_rows() -> None:
    assert batches.score_rows(256, 1_000_000) == batches.SCORE_BUDGET // 1_000_000
    assert batches.score_rows(256, 1_600) == 256
    assert batches.score_rows(256, 10**9) == 1
