"""Chunked top-K (serving.ServingModel, ``topk_chunk``): the exported graph ranks exactly like an
unchunked one, ties (lower item id first, as ONNX's TopK) and exclude lists included."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from m4r_export.model import Mamba4Rec
from m4r_export.onnx import export as ex
from m4r_export.serving import ServingModel
from m4r_export.verify.testing import trained_like_

N_ITEMS, K, CHUNK = 45, 6, 7


def tied_model() -> Mamba4Rec:
    """Item i's embedding is one of 3 rows (i % 3): every score is tied with ~15 others across chunks."""
    torch.manual_seed(0)
    model = trained_like_(Mamba4Rec(N_ITEMS, hidden_size=16, num_layers=1, d_state=8).eval(), 0)
    with torch.no_grad():
        base = torch.randn(3, 16)
        model.item_embedding.weight.copy_(base[torch.arange(N_ITEMS) % 3])
    return model


def inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    seq = rng.integers(1, N_ITEMS, size=(6, 9)).astype(np.int64)
    lens = np.array([9, 1, 4, 9, 2, 7], dtype=np.int64)
    exclude = rng.integers(-2, N_ITEMS + 3, size=(6, 8)).astype(np.int64)
    exclude[1] = 0  # nothing excluded
    exclude[2, :4] = [1, 4, 7, 22]  # the lowest ids of one tie class, across chunks
    # row 5 excludes all but items 2 and 40: fewer rankable items than K (-inf tail)
    wide = np.array([i for i in range(1, N_ITEMS) if i not in (2, 40)], dtype=np.int64)
    ex_all = np.zeros((6, len(wide)), dtype=np.int64)
    ex_all[:, : exclude.shape[1]] = exclude
    ex_all[5] = wide
    return seq, lens, ex_all


def reference_topk(model: Mamba4Rec, seq: np.ndarray, lens: np.ndarray, exclude: np.ndarray) -> Any:
    """Unchunked top-K with numpy: stable sort on -score, so ties go to the lower item id."""
    serving = ServingModel(model, "embedding")
    with torch.no_grad():
        user = serving(torch.from_numpy(seq), torch.from_numpy(lens))[0]
        scores = (user @ model.item_embedding.weight.t()).numpy()
    scores[:, 0] = -np.inf
    for row, ids in enumerate(exclude):
        ids = ids[(ids >= 1) & (ids < N_ITEMS)]
        scores[row, ids] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    return np.take_along_axis(scores, order, axis=1), order


def ort_topk(model: Mamba4Rec, chunk: int, seq: np.ndarray, lens: np.ndarray, exclude: np.ndarray) -> Any:
    opts = ex.ExportOptions(head="topk", k=K, max_seq_len=9, topk_chunk=chunk)
    proto = ex.trace_onnx(model, opts)
    # the chunked subgraph is the body of the m4r::ScoreTopK node (tests/test_score_topk.py: the native op)
    body = [n for f in proto.functions if f.name == "ScoreTopK" for n in f.node]
    tops = [n for n in [*proto.graph.node, *body] if n.op_type == "TopK"]
    sess = ex.ort_session(proto.SerializeToString())
    scores, items = sess.run(None, {"item_seq": seq, "item_seq_len": lens, "exclude_items": exclude})
    return scores, items, len(tops)


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    model = tied_model()
    seq, lens, exclude = inputs()
    return {
        "ref": reference_topk(model, seq, lens, exclude),
        "chunked": ort_topk(model, CHUNK, seq, lens, exclude),
        "whole": ort_topk(model, 1000, seq, lens, exclude),
    }


def test_chunked_graph_merges_partial_topks(results: dict[str, Any]) -> None:
    assert results["chunked"][2] == -(-N_ITEMS // CHUNK) + 1  # one TopK per chunk + the merge
    assert results["whole"][2] == 1


def test_chunked_equals_unchunked_with_ties_and_excludes(results: dict[str, Any]) -> None:
    ref_scores, ref_items = results["ref"]
    for name in ("chunked", "whole"):
        scores, items, _ = results[name]
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5, err_msg=name)
        finite = np.isfinite(ref_scores)
        # every recommendation (finite score) is the reference's, ties in lower-id-first order
        np.testing.assert_array_equal(np.where(finite, items, -1), np.where(finite, ref_items, -1), name)
    # the -inf tail of row 5 too: the chunked graph returns exactly what the unchunked one does
    np.testing.assert_array_equal(results["chunked"][1], results["whole"][1])
    np.testing.assert_array_equal(results["chunked"][0], results["whole"][0])
    assert np.isfinite(ref_scores[5]).sum() == 2 and set(ref_items[5, :2]) == {2, 40}
    assert not np.isin(ref_items[2], [1, 4, 7, 22]).any()


def test_torch_chunked_matches_unchunked_scores() -> None:
    model = tied_model()
    seq, lens, exclude = (torch.from_numpy(a) for a in inputs())
    with torch.no_grad():
        a = ServingModel(model, "topk", K, topk_chunk=CHUNK)(seq, lens, exclude)
        b = ServingModel(model, "topk", K, topk_chunk=10_000)(seq, lens, exclude)
    torch.testing.assert_close(a[0], b[0])


def test_chunk_never_smaller_than_k() -> None:
    model = tied_model()
    assert ServingModel(model, "topk", K, topk_chunk=2).topk_chunk == K
    with pytest.raises(ValueError, match="topk_chunk"):
        ServingModel(model, "topk", K, topk_chunk=0)


def test_eager_topk_ranks_like_the_traced_chunks_and_the_reference() -> None:
    """Eager top-K (no_grad: one reused score buffer, -inf set in place) returns the reference's scores,
    as the chunked code the export is traced from does (run with grad enabled), and only items that
    have those scores and are rankable: exclude lists, item 0 and a last chunk narrower than K included.
    (PyTorch's TopK orders tied items arbitrarily, so tied ids are checked by their scores.)"""
    model = tied_model()
    seq, lens, exclude = inputs()
    serving = ServingModel(model, "topk", K, topk_chunk=CHUNK)
    args = [torch.from_numpy(a) for a in (seq, lens, exclude)]
    with torch.no_grad():
        eager = serving(*args)
        user = ServingModel(model, "embedding")(*args[:2])[0]
        true_scores = (user @ model.item_embedding.weight.t()).numpy()
    traced_code = serving(*args)
    ref_scores, _ = reference_topk(model, seq, lens, exclude)
    for scores, items in (eager, traced_code):
        scores, items = scores.detach().numpy(), items.numpy()
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
        for row in range(len(seq)):
            got = items[row][np.isfinite(ref_scores[row])]
            assert len(set(got)) == len(got) and 0 not in got
            assert not np.isin(got, exclude[row]).any()
            np.testing.assert_allclose(true_scores[row, got], scores[row][: len(got)], rtol=1e-5, atol=1e-5)
