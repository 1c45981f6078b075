"""m4r verify end to end on tiny models: pass, fail with exit 1 naming the metric, usage errors (exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from shared_data import ml100k_path, require_ml100k

from m4r_export.checkpoint import save_checkpoint
from m4r_export.cli import main
from m4r_export.errors import UsageError
from m4r_export.verify import BACKENDS, Runner, make_runner, run_verify
from m4r_export.verify.artifact import load_artifact
from m4r_export.verify.runners import ArtifactRunner, OrtCpuRunner, TensorrtEngineRunner
from m4r_export.verify.testing import perturb_onnx_weight, rehash_manifest, tiny_model, trace_onnx
from m4r_export.verify.verify import Thresholds

N_ITEMS = 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("verify")
    model = tiny_model(N_ITEMS)
    save_checkpoint(root / "model.pt", model, None, {"max_seq_len": 12})
    paths = {"ckpt": root / "model.pt", "root": root}
    for head in ("scores", "topk", "embedding"):
        paths[head] = trace_onnx(model, root / head, head=head, k=10)
    paths["exclude"] = trace_onnx(model, root / "exclude", head="topk", k=10, exclude_history=True)
    return paths


def perturbed_copy(src: Path, dst_dir: Path, scale: float) -> Path:
    """Copy ``src``'s export directory, perturb one weight, re-hash the manifest (so parity is judged)."""
    shutil.copytree(src.parent, dst_dir, dirs_exist_ok=True)
    perturb_onnx_weight(src, dst_dir / src.name, scale=scale)
    rehash_manifest(dst_dir)
    return dst_dir / src.name


def _cli(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


@pytest.mark.parametrize("head", ["scores", "topk", "embedding", "exclude"])
def test_verify_passes_on_a_faithful_artifact(tiny: dict[str, Path], head: str, tmp_path: Path) -> None:
    code, out = _cli(
        "verify", "--ckpt", tiny["ckpt"], "--artifact", tiny[head], "--users", 64, "--k", 5,
        "--json", tmp_path / "r.json",
    )  # fmt: skip
    assert code == 0, out
    assert "PASS" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is True
    assert report["threshold_source"] == "defaults for fp32 artifacts"
    assert report["thresholds"]["max_abs_error"] == Thresholds.defaults("fp32").max_abs_error
    m = report["results"][0]["metrics"]
    assert m["max_abs_error"] < 1e-4
    assert m["topk_overlap_min"] == 1.0 and m["kendall_tau_min"] == 1.0 and m["rbo_min"] == pytest.approx(1)
    assert m["non_finite"] == 0 and m["mask_mismatches"] == 0
    assert report["results"][0]["topk_overlap_histogram"] == {"5/5": 64}
    assert report["inputs"]["length_min"] == 1 and report["inputs"]["length_max"] == 12


def test_perturbed_weight_fails_with_exit_1_naming_the_metric(tiny: dict[str, Path], tmp_path: Path) -> None:
    bad = perturbed_copy(tiny["scores"], tmp_path, scale=0.5)
    code, out = _cli(
        "verify", "--ckpt", tiny["ckpt"], "--artifact", bad, "--users", 64, "--json", tmp_path / "r.json"
    )
    assert code == 1, out
    assert "parity FAILED" in out and "max_abs_error = " in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is False
    assert any(f.startswith("max_abs_error") for f in report["results"][0]["failures"])
    # a loose enough threshold turns the same artifact into a pass on that metric
    code, out = _cli(
        "verify", "--ckpt", tiny["ckpt"], "--artifact", bad, "--users", 64, "--max-abs-error", 100,
        "--max-rel-error", 1e9, "--min-kendall-tau", -1, "--min-overlap-mean", 0, "--min-overlap-min", 0,
        "--min-rbo", 0,
    )  # fmt: skip
    assert code == 0, out


def test_nan_output_is_reported_as_non_finite(tiny: dict[str, Path], tmp_path: Path) -> None:
    bad = perturbed_copy(tiny["scores"], tmp_path, scale=float("nan"))
    report = run_verify(tiny["ckpt"], bad, users=16)
    assert not report.passed
    assert report.results[0].metrics["nan"] > 0
    assert "non_finite" in report.failure_message()


def test_dataset_inputs_give_offline_metrics(tmp_path: Path) -> None:
    from m4r_export.data import load_dataset, synthetic_interactions, write_inter_file

    users, items, ts = synthetic_interactions(n_users=60, n_items=30, seed=1)
    inter = tmp_path / "syn.inter"
    write_inter_file(inter, users, items, ts)
    ds = load_dataset(inter, max_seq_len=12)
    model = tiny_model(ds.n_items)
    save_checkpoint(tmp_path / "model.pt", model, list(ds.item_tokens), {"max_seq_len": 12})
    art = trace_onnx(model, tmp_path / "art", head="scores")
    report = run_verify(tmp_path / "model.pt", art, data=inter, users=1000, k=5)
    assert report.passed, report.failure_message()
    m = report.results[0].metrics
    assert m["hit@5_delta"] == 0.0 and m["ndcg@5_delta"] == 0.0
    assert 0.0 <= m["hit@5_ref"] <= 1.0
    assert report.inputs["users"] == len(ds.test)
    # the same model saved with a reordered vocabulary: its ids mean other items than the data's, so
    # verify refuses the mix exactly as `m4r evaluate` does (issue 22.4)
    perm = np.r_[0, np.random.default_rng(0).permutation(np.arange(1, ds.n_items))]
    tokens = [ds.item_tokens[i] for i in perm]
    save_checkpoint(tmp_path / "perm.pt", model, tokens, {"max_seq_len": 12})
    with pytest.raises(UsageError, match="item vocabulary mismatch"):
        run_verify(tmp_path / "perm.pt", art, data=inter, users=1000, k=5, allow_other_checkpoint=True)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--artifact", "missing.onnx"], "does not exist"),
        (["--artifact", "{ckpt}"], "unknown file type"),
        (["--artifact", "{topk}", "--k", "11"], "top-K"),
        (["--artifact", "{scores}", "--backend", "nope"], "unknown backend"),
        (["--artifact", "{scores}", "--data", "missing.inter"], "does not exist"),
        (["--artifact", "{scores}", "--users", "0"], "--users"),
    ],
)
def test_usage_errors_exit_2(tiny: dict[str, Path], args: list[str], needle: str) -> None:
    args = [a.format(**{k: str(v) for k, v in tiny.items()}) for a in args]
    code, out = _cli("verify", "--ckpt", tiny["ckpt"], *args)
    assert code == 2, out
    assert needle in out


def test_checkpoint_that_does_not_match_the_artifact_is_a_usage_error(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    save_checkpoint(tmp_path / "other.pt", tiny_model(N_ITEMS + 5), None)
    with pytest.raises(UsageError, match="n_items"):
        run_verify(tmp_path / "other.pt", tiny["scores"], users=4)


def test_plot_is_written(tiny: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    code, out = _cli(
        "verify",
        "--ckpt",
        tiny["ckpt"],
        "--artifact",
        tiny["scores"],
        "--users",
        16,
        "--plot",
        tmp_path / "o.png",
    )
    assert code == 0, out
    assert (tmp_path / "o.png").read_bytes()[:4] == b"\x89PNG"


def test_artifact_without_manifest_infers_the_head(tiny: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(tiny["topk"].read_bytes())
    art = load_artifact(tmp_path / "model.onnx")
    assert (art.head, art.k, art.precision) == ("topk", 10, "fp32")
    assert any("no manifest.json" in n for n in art.notes)


def test_adding_a_backend_is_one_class(tiny: dict[str, Path]) -> None:
    class EchoRunner(ArtifactRunner):
        """Wraps ORT CPU and flips the best two items: a stand-in for a buggy backend."""

        backend = "test-echo"
        kinds = ("onnx",)

        def __init__(self, artifact: object, *, threads: int | None = None) -> None:
            self.inner = OrtCpuRunner(artifact, threads=threads)  # type: ignore[arg-type]
            self.output_names = self.inner.output_names
            self.takes_exclude = self.inner.takes_exclude
            self.name = self.backend

        def infer(
            self, item_seq: np.ndarray, item_seq_len: np.ndarray, exclude_items: np.ndarray | None
        ) -> dict[str, np.ndarray]:
            scores = self.inner.infer(item_seq, item_seq_len, exclude_items)["scores"].copy()
            rows = np.arange(len(scores))
            best = np.argsort(-scores, axis=1, kind="stable")[:, :2]
            first, second = scores[rows, best[:, 0]], scores[rows, best[:, 1]]
            scores[rows, best[:, 0]], scores[rows, best[:, 1]] = second, first
            return {"scores": scores}

    try:
        assert BACKENDS["test-echo"] is EchoRunner
        runner = make_runner("test-echo", load_artifact(tiny["scores"]))
        assert isinstance(runner, Runner)
        report = run_verify(tiny["ckpt"], tiny["scores"], users=8, backends=["ort-cpu", "test-echo"])
        assert [r.backend for r in report.results] == ["ort-cpu", "test-echo"]
        good, flipped = report.results
        assert good.passed and not flipped.passed and not report.passed
        # same items, another order: overlap holds, the order gates and the score error catch it
        assert flipped.metrics["topk_overlap_min"] == 1.0
        failed = {c.metric for c in flipped.failures}
        assert {"kendall_tau_mean", "rbo_mean", "max_abs_error"} <= failed
        assert "topk_overlap_mean" not in failed
        assert "test-echo: " in report.failure_message() and "kendall_tau_mean = " in report.failure_message()
    finally:
        BACKENDS.pop("test-echo", None)


def test_unavailable_backends_say_why(tiny: dict[str, Path]) -> None:
    reason = TensorrtEngineRunner.unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present")
    assert "tensorrt" in reason.lower() or "gpu" in reason.lower() or "driver" in reason.lower()
    with pytest.raises(UsageError, match="cannot run onnx artifacts"):
        make_runner("tensorrt", load_artifact(tiny["scores"]))
    cuda = BACKENDS["ort-cuda"].unavailable_reason()
    if cuda is not None:
        assert "CUDAExecutionProvider" in cuda
        with pytest.raises(UsageError, match="CUDAExecutionProvider"):
            make_runner("ort-cuda", load_artifact(tiny["scores"]))
        code, out = _cli(
            "verify", "--ckpt", tiny["ckpt"], "--artifact", tiny["scores"], "--backend", "ort-cuda"
        )
        assert code == 2 and "cannot run here" in out


def test_engine_artifact_reads_its_onnx_manifest(tiny: dict[str, Path], tmp_path: Path) -> None:
    shutil.copytree(tiny["topk"].parent, tmp_path, dirs_exist_ok=True)
    (tmp_path / "model.plan").write_bytes(b"not a real engine")
    (tmp_path / "model.plan.json").write_text(
        json.dumps({"format": "m4r-trt-engine/1", "onnx": {"file": "model.onnx"}, "profile": {}})
    )
    art = load_artifact(tmp_path / "model.plan")
    assert (art.kind, art.head, art.k, art.onnx_path) == ("engine", "topk", 10, tmp_path / "model.onnx")
    with pytest.raises(UsageError, match="cannot run engine artifacts"):
        make_runner("ort-cpu", art)
    if TensorrtEngineRunner.unavailable_reason() is not None:
        with pytest.raises(UsageError, match="tensorrt cannot run here"):
            make_runner("tensorrt", art)
    (tmp_path / "model.plan.json").unlink()
    with pytest.raises(UsageError, match="manifest"):
        load_artifact(tmp_path / "model.plan")


def test_manifest_precision_cannot_loosen_the_verdict(tiny: dict[str, Path], tmp_path: Path) -> None:
    """Issue 8 item 6: "precision": "fp16" in an fp32 artifact's manifest must not pick fp16 thresholds."""
    bad = perturbed_copy(tiny["scores"], tmp_path, scale=0.05)  # fails fp32 limits, passes fp16 ones
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["precision"] = "fp16"
    manifest["files"]["model.onnx"]["precision"] = "fp16"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert load_artifact(bad).precision == "fp32"  # the graph's tensor types decide
    report = run_verify(tiny["ckpt"], bad, users=32)
    assert report.thresholds == Thresholds.defaults("fp32")
    assert not report.passed, report.results[0].metrics
    # ... while fp16 limits (what the edited manifest asked for) would have passed it
    assert run_verify(tiny["ckpt"], bad, users=32, thresholds=Thresholds.defaults("fp16")).passed


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("k", "abc", "k is 'abc'"),
        ("max_seq_len", 1e9, "max_seq_len is 1000000000.0"),
        ("exclude_history", "yes", "exclude_history is 'yes'"),
        ("head", "all", "head is 'all'"),
        ("model", {"n_items": "40"}, "n_items is '40'"),
    ],
)
def test_bad_manifest_values_are_a_clear_error(
    tiny: dict[str, Path], tmp_path: Path, field: str, value: object, message: str
) -> None:
    shutil.copytree(tiny["topk"].parent, tmp_path, dirs_exist_ok=True)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest[field] = value
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    code, out = _cli("verify", "--ckpt", tiny["ckpt"], "--artifact", tmp_path / "model.onnx", "--users", 8)
    assert code == 3, out
    assert out.startswith("Error: ") and message in out and "Traceback" not in out, out


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An artifact written by the real exporter (m4r export), fp32."""
    export = pytest.importorskip("m4r_export.onnx.export")
    root = tmp_path_factory.mktemp("exported")
    model = tiny_model(N_ITEMS, seed=3)
    save_checkpoint(root / "model.pt", model, None, {"max_seq_len": 12})
    export.export_artifacts(
        model, root / "out", export.ExportOptions(head="scores", max_seq_len=12), build_trt=False
    )
    return {"ckpt": root / "model.pt", "onnx": root / "out" / "model.onnx"}


def test_exporter_artifact_passes_and_one_perturbed_weight_fails(
    exported: dict[str, Path], tmp_path: Path
) -> None:
    code, out = _cli("verify", "--ckpt", exported["ckpt"], "--artifact", exported["onnx"], "--users", 64)
    assert code == 0, out
    bad = perturbed_copy(exported["onnx"], tmp_path / "bad", scale=0.5)
    code, out = _cli("verify", "--ckpt", exported["ckpt"], "--artifact", bad, "--users", 64)
    assert code == 1, out
    assert "max_abs_error = " in out, out


ML100K = ml100k_path()


@pytest.mark.slow
def test_ml100k_end_to_end_with_the_exporter(tmp_path: Path) -> None:
    """Real data, real exporter, fp32 and fp16: both pass their default thresholds."""
    require_ml100k()
    export = pytest.importorskip("m4r_export.onnx.export")
    from m4r_export.data import load_dataset

    ds = load_dataset(ML100K, max_seq_len=50)
    model = tiny_model(ds.n_items, hidden_size=32, d_state=16)
    save_checkpoint(tmp_path / "model.pt", model, list(ds.item_tokens), {"max_seq_len": 50})
    opts = export.ExportOptions(head="scores", max_seq_len=50, fp16=True)
    export.export_artifacts(model, tmp_path / "out", opts, build_trt=False)
    for name, precision in (("model.onnx", "fp32"), ("model.fp16.onnx", "fp16")):
        report = run_verify(tmp_path / "model.pt", tmp_path / "out" / name, data=ML100K, users=300)
        assert report.artifact.precision == precision
        assert report.passed, report.failure_message()
        assert report.results[0].metrics["users"] == 300
