"""Approximate retrieval (issue 19 item 5): the faiss index as an export artifact, its recall in verify."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from m4r_export import ann
from m4r_export.checkpoint import save_checkpoint
from m4r_export.cli import main
from m4r_export.fileio import sha256_file
from m4r_export.onnx import export as ex
from m4r_export.verify import run_verify
from m4r_export.verify.testing import tiny_model
from m4r_export.verify.verify import generated_inputs

N_ITEMS, K = 400, 5


def test_recall_counts_shared_items_not_positions() -> None:
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[4, 3, 2, 1], [5, 9, 10, 6]])  # same set in another order; 2 of 4
    np.testing.assert_allclose(ann.recall(exact, approx), [1.0, 0.5])


def test_exhaustive_ivf_is_exact_and_skips_padding() -> None:
    rng = np.random.default_rng(0)
    table = rng.normal(size=(N_ITEMS, 16)).astype(np.float32)
    table[0] = 100.0  # padding would win every query if it were indexed
    users = rng.normal(size=(20, 16)).astype(np.float32)
    nlist = ann.lists_for(N_ITEMS, ann.AnnParams())
    index = ann.build_index(table, ann.AnnParams(nprobe=nlist), threads=1)
    scores, items = ann.search(index, users, K)
    exact_scores = users @ table.T
    exact_scores[:, 0] = -np.inf
    exact = np.argsort(-exact_scores, axis=1)[:, :K]
    np.testing.assert_array_equal(items, exact)
    np.testing.assert_allclose(scores, np.take_along_axis(exact_scores, exact, axis=1), rtol=1e-5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ann")
    model = tiny_model(N_ITEMS, seed=1)
    save_checkpoint(root / "model.pt", model, None, {"max_seq_len": 8})
    ex.export_artifacts(
        model,
        root / "out",
        ex.ExportOptions(head="embedding", max_seq_len=8, ann="ivf"),
        checkpoint_path=root / "model.pt",
        build_trt=False,
    )
    return {"dir": root / "out", "ckpt": root / "model.pt"}


def test_index_is_an_artifact_with_parameters_and_sha256(exported: dict[str, Path]) -> None:
    d = exported["dir"]
    m = json.loads((d / "manifest.json").read_text())
    assert m["ann"]["file"] == ann.INDEX_FILE and m["ann"]["kind"] == "ivf"
    assert m["ann"]["nlist"] == ann.lists_for(N_ITEMS, ann.AnnParams()) and m["ann"]["nprobe"] == 64
    assert m["files"][ann.INDEX_FILE]["sha256"] == sha256_file(d / ann.INDEX_FILE)


def test_verify_reports_the_recall_it_should(exported: dict[str, Path]) -> None:
    d = exported["dir"]
    report = run_verify(exported["ckpt"], d / "model.onnx", users=60, k=K)
    metrics = report.results[0].metrics
    # the same recall computed independently: ORT user vectors, numpy exact top-K, faiss search
    inputs = generated_inputs(N_ITEMS, 60, 8)
    sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    (user,) = sess.run(None, {"item_seq": inputs.item_seq, "item_seq_len": inputs.item_seq_len})
    table = np.load(d / "item_embedding.npy")
    scores = user @ table.T
    scores[:, 0] = -np.inf
    exact = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    spec = json.loads((d / "manifest.json").read_text())["ann"]
    _, approx = ann.search(ann.read_index(d / ann.INDEX_FILE, ann.AnnParams.from_json(spec)), user, K)
    expected = ann.recall(exact, approx)
    assert metrics[f"ann_recall@{K}_mean"] == pytest.approx(expected.mean())
    assert metrics[f"ann_recall@{K}_min"] == pytest.approx(expected.min())
    assert 0.0 < expected.mean() <= 1.0


def test_tampered_index_is_refused(exported: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "art"
    shutil.copytree(exported["dir"], d)
    data = bytearray((d / ann.INDEX_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / ann.INDEX_FILE).write_bytes(bytes(data))
    res = CliRunner().invoke(
        main, ["verify", "--ckpt", str(exported["ckpt"]), "--artifact", str(d / "model.onnx"), "--k", str(K)]
    )
    assert res.exit_code == 3 and "item_index.faiss does not match its sha256" in res.output, res.output


def test_ann_needs_the_embedding_head() -> None:
    with pytest.raises(Exception, match="--head embedding"):
        ex.ExportOptions(head="topk", ann="ivf").validate(N_ITEMS)


KNOB = {"pq": ("k_factor", lambda i: i.k_factor), "ivf": ("nprobe", lambda i: i.nprobe)}
KNOB["hnsw"] = ("ef_search", lambda i: i.hnsw.efSearch)


@pytest.mark.parametrize(
    ("kind", "flag", "value"),
    [("hnsw", "--ann-ef-search", 77), ("ivf", "--ann-nprobe", 9), ("pq", "--ann-k-factor", 7)],
)
def test_search_knob_is_stored_and_used_by_readers(tmp_path: Path, kind: str, flag: str, value: int) -> None:
    """The search-time knob goes into the manifest and every reader's index (an hnsw export once
    wrote nlist: null, which the manifest reader refused)."""
    from m4r_export.retrieval import AnnRetriever

    model = tiny_model(200, seed=2)
    save_checkpoint(tmp_path / "m.pt", model, None, {"max_seq_len": 6})
    out = tmp_path / "out"
    args = ["export", "--ckpt", str(tmp_path / "m.pt"), "--out-dir", str(out), "--head", "embedding"]
    res = CliRunner().invoke(main, [*args, "--ann", kind, flag, str(value)])
    assert res.exit_code == 0, res.output
    spec = json.loads((out / "manifest.json").read_text())["ann"]
    key, knob = KNOB[kind]
    assert spec["kind"] == kind and spec[key] == value
    assert knob(AnnRetriever(out).index) == value
    bad = CliRunner().invoke(main, [*args, "--ann", kind, flag, "0"])
    assert bad.exit_code == 2 and f"{flag} 0: must be >= 1" in bad.output


# ------------------------------------------------------------------------- pq (the default kind)


def _gaussian(n: int, dim: int, users: int) -> tuple[np.ndarray, np.ndarray]:
    """An i.i.d. Gaussian table (an untrained one: no cluster structure) and query vectors."""
    rng = np.random.default_rng(7)
    return rng.normal(size=(n, dim)).astype(np.float32), rng.normal(size=(users, dim)).astype(np.float32)


@pytest.mark.parametrize("refine", ["fp32", "fp16"])
def test_pq_finds_neighbours_on_an_unstructured_table_where_ivf_cannot(refine: str) -> None:
    """Recall@10 >= 0.95 on 20K Gaussian items with the default pq parameters, where IVF probing 4
    of its 565 lists finds few of them; the scores are the re-ranked inner products (exact in fp32)."""
    table, users = _gaussian(20_000, 32, 200)
    exact_scores = users @ table.T
    exact_scores[:, 0] = -np.inf
    exact = np.argsort(-exact_scores, axis=1)[:, :10]
    index = ann.build_index(table, ann.AnnParams(refine=refine), threads=1)
    scores, items = ann.search(index, users, 10)
    assert ann.recall(exact, items).mean() >= 0.95
    np.testing.assert_allclose(
        scores, np.take_along_axis(exact_scores, items, axis=1), rtol=1e-5 if refine == "fp32" else 5e-3
    )
    ivf = ann.build_index(table, ann.AnnParams(kind="ivf", nprobe=4), threads=1)
    assert ann.recall(exact, ann.search(ivf, users, 10)[1]).mean() < 0.5


def test_pq_default_is_written_and_old_manifests_still_read() -> None:
    assert ann.AnnParams().kind == "pq" and ann.KINDS[0] == "pq"
    old_ivf = {"kind": "ivf", "nlist": 80, "nprobe": 64, "m": 32, "ef_construction": 64, "ef_search": 256}
    p = ann.AnnParams.from_json({**old_ivf, "metric": "inner_product", "file": ann.INDEX_FILE})
    assert (p.kind, p.nlist, p.nprobe, p.k_factor, p.refine) == ("ivf", 80, 64, 64, "fp32")
    new = ann.AnnParams(kind="pq", pq_m=8, k_factor=5, refine="fp16")
    assert ann.AnnParams.from_json(new.to_json()) == new


@pytest.fixture(scope="module")
def exported_pq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pq") / "out"
    # k_factor 1: the re-ranking sees only k + m candidates, so a deeper search changes answers
    opts = ex.ExportOptions(head="embedding", max_seq_len=8, ann="pq", ann_k_factor=1)
    ex.export_artifacts(tiny_model(N_ITEMS, seed=5), out, opts, build_trt=False)
    return out


def test_pq_export_lists_its_parameters(exported_pq: Path) -> None:
    m = json.loads((exported_pq / "manifest.json").read_text())
    spec = m["ann"]
    assert (spec["kind"], spec["pq_m"], spec["k_factor"], spec["refine"]) == ("pq", 8, 1, "fp32")  # hidden 16
    assert m["files"][ann.INDEX_FILE]["sha256"] == sha256_file(exported_pq / ann.INDEX_FILE)


def test_pq_exclusions_are_dropped_and_a_row_does_not_depend_on_its_batch(exported_pq: Path) -> None:
    """Each row's answer is the index's top-(K + its own excluded count), filtered, whatever other
    rows (with more exclusions) share its batch; computed independently with faiss."""
    import faiss

    from m4r_export.retrieval import AnnRetriever

    retriever = AnnRetriever(exported_pq, threads=1)
    rng = np.random.default_rng(0)
    users = rng.normal(size=(12, 16)).astype(np.float32)
    _, plain = retriever.search(users, K)
    exclude = np.zeros((12, 9), np.int64)  # 0 = none
    for r in range(1, 12, 2):
        exclude[r, :2] = plain[r, :2]
        exclude[r, 2 : 2 + r // 2] = rng.integers(1, N_ITEMS, size=r // 2)
    exclude[11, -1] = N_ITEMS + 5  # out of range: ignored
    scores, items = retriever.search(users, K, exclude)
    index = faiss.read_index(str(exported_pq / ann.INDEX_FILE))
    index.k_factor = 1
    for r in range(12):
        banned = {int(i) for i in exclude[r] if 0 < i < N_ITEMS}
        assert not banned & set(items[r].tolist())
        s, ids = index.search(users[r : r + 1], K + len(banned))
        want = [
            (float(a), int(b) + 1)
            for a, b in zip(s[0], ids[0], strict=True)
            if b >= 0 and b + 1 not in banned
        ]
        assert items[r].tolist() == [b for _, b in want[:K]], r
        np.testing.assert_allclose(scores[r], [a for a, _ in want[:K]], rtol=1e-6)


def test_pq_parameters_that_cannot_build_are_usage_errors(tmp_path: Path) -> None:
    model = tiny_model(200, seed=2)
    save_checkpoint(tmp_path / "m.pt", model, None, {"max_seq_len": 6})
    args = [
        "export",
        "--ckpt",
        str(tmp_path / "m.pt"),
        "--out-dir",
        str(tmp_path / "o"),
        "--head",
        "embedding",
    ]
    res = CliRunner().invoke(main, [*args, "--ann", "pq", "--ann-pq-m", "5"])
    assert res.exit_code == 2 and "--ann-pq-m 5: must divide the hidden size 16" in res.output, res.output
    assert not (tmp_path / "o").exists()
    with pytest.raises(Exception, match="needs at least 16"):
        ann.build_index(np.ones((10, 16), np.float32), ann.AnnParams())
