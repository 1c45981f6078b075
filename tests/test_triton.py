"""``m4r triton``: generated repositories (schema, manifest-driven I/O, atomicity) and a real server.

The server tests start the ``tritonserver`` bundled in the nvidia-pytriton wheel on 127.0.0.1 with
a generated ``python`` repository and compare its answers with the PyTorch model. Where that
server cannot run, they are skipped with the reason (the server log's first error line, shown by
pytest's ``-ra`` summary), or fail when $M4R_REQUIRE_TRITON=1 (CI).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from shared_data import import_or_skip

from m4r_export.cli import main
from m4r_export.errors import M4RError
from m4r_export.onnx.export import ExportOptions, export_artifacts
from m4r_export.serving import ServingModel
from m4r_export.verify.testing import tiny_model

pb = import_or_skip(
    "tritonclient.grpc.model_config_pb2", "M4R_REQUIRE_TRITON", "tritonclient is not installed"
)
text_format = import_or_skip("google.protobuf.text_format", "M4R_REQUIRE_TRITON", "protobuf is not installed")

K, MAX_SEQ = 10, 12
N_ITEMS = 40
MODEL = "m4r_topk"


def _model() -> Any:
    model = tiny_model(N_ITEMS)
    model.item_tokens = ["[PAD]"] + [f"tok{i}" for i in range(1, N_ITEMS)]
    return model


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export")
    export_artifacts(_model(), out, ExportOptions(head="topk", k=K, max_seq_len=MAX_SEQ), build_trt=False)
    return out


def run_cli(*args: str) -> Any:
    return CliRunner().invoke(main, ["triton", *args], catch_exceptions=False)


def parse(path: Path) -> Any:
    """config.pbtxt parsed with Triton's own schema (raises on any unknown field or bad value)."""
    return text_format.Parse(path.read_text(), pb.ModelConfig())


def configs(repo: Path) -> dict[str, Any]:
    return {p.parent.name: parse(p) for p in sorted(repo.glob("*/config.pbtxt"))}


def fake_engine(export_dir: Path, tmp: Path) -> tuple[Path, Path]:
    """A copy of the export with a stand-in engine + engine manifest, and a stand-in plugin library."""
    from m4r_export.fileio import sha256_file

    art = tmp / "with_engine"
    shutil.copytree(export_dir, art)
    (art / "model.plan").write_bytes(b"not a real engine")
    meta = {
        "format": "m4r-trt-engine/1",
        "engine": "model.plan",
        "engine_sha256": sha256_file(art / "model.plan"),
        "onnx": {"file": "model.onnx", "sha256": sha256_file(art / "model.onnx")},
        "profile": {"batch": [1, 64, 256], "seq": [1, 12, MAX_SEQ]},
    }
    (art / "model.plan.json").write_text(json.dumps(meta))
    plugin = tmp / "libm4r_trt_plugin_static.so"
    plugin.write_bytes(b"\x7fELF stand-in")
    return art, plugin


# ------------------------------------------------------------------------------ generator, no server


def test_every_backend_and_the_ensemble_parse_against_tritons_schema(
    export_dir: Path, tmp_path: Path
) -> None:
    manifest = json.loads((export_dir / "manifest.json").read_text())
    art, plugin = fake_engine(export_dir, tmp_path)
    ort_ops = tmp_path / "libm4r_ort_ops.so"
    ort_ops.write_bytes(b"\x7fELF stand-in")
    repos = {
        "python": ["--backend", "python", "--with-tokens"],
        "onnxruntime": ["--backend", "onnxruntime", "--with-tokens", "--ort-ops", str(ort_ops)],
        "tensorrt": ["--backend", "tensorrt", "--with-tokens", "--plugin", str(plugin), "--instances", "2"],
    }
    for backend, extra in repos.items():
        repo = tmp_path / f"repo_{backend}"
        result = run_cli("--artifacts", str(art), "--repo", str(repo), "--max-batch", "32", *extra)
        assert result.exit_code == 0, result.output
        cfgs = configs(repo)
        assert set(cfgs) == {MODEL, f"{MODEL}_tokens", f"{MODEL}_tokens_pre", f"{MODEL}_tokens_post"}
        model = cfgs[MODEL]
        assert model.max_batch_size == 32
        # I/O from the manifest: names, types; batch implicit; history fixed at max_seq_len
        assert [i.name for i in model.input] == [i["name"] for i in manifest["inputs"]]
        assert [o.name for o in model.output] == [o["name"] for o in manifest["outputs"]]
        seq, length, exclude = model.input
        assert (exclude.name, list(exclude.dims), exclude.optional) == (
            "exclude_items",
            [-1],
            backend == "python",
        )
        assert seq.data_type == pb.TYPE_INT64 and list(seq.dims) == [MAX_SEQ]
        assert list(length.dims) == [1] and length.HasField("reshape") and list(length.reshape.shape) == []
        assert [list(o.dims) for o in model.output] == [[K], [K]]
        assert [o.data_type for o in model.output] == [pb.TYPE_FP32, pb.TYPE_INT64]
        assert list(model.dynamic_batching.preferred_batch_size) == [4, 8, 16, 32]
        assert model.version_policy.HasField("latest")
        ens = cfgs[f"{MODEL}_tokens"]
        assert ens.platform == "ensemble"
        assert [s.model_name for s in ens.ensemble_scheduling.step] == [
            f"{MODEL}_tokens_pre",
            MODEL,
            f"{MODEL}_tokens_post",
        ]
        assert (repo / f"{MODEL}_tokens" / "1").is_dir()  # Triton loads no ensemble without a version
        assert (repo / "README.md").is_file()
    py, ort, trt = (configs(tmp_path / f"repo_{b}")[MODEL] for b in repos)
    assert py.backend == "python" and py.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert (tmp_path / "repo_python" / MODEL / "1" / "model.py").is_file()
    assert ort.platform == "onnxruntime_onnx"
    assert list(ort.model_operations.op_library_filename) == ["../../ortops/libm4r_ort_ops.so"]
    assert (
        (tmp_path / "repo_onnxruntime" / MODEL / "1" / "../../ortops/libm4r_ort_ops.so").resolve().is_file()
    )
    assert trt.platform == "tensorrt_plan" and trt.instance_group[0].count == 2
    assert trt.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert (tmp_path / "repo_tensorrt" / MODEL / "1" / "model.plan").read_bytes() == b"not a real engine"
    assert (tmp_path / "repo_tensorrt" / "plugins" / plugin.name).is_file()
    # the engine's profile must cover what the repository sends
    small = run_cli(
        "--artifacts",
        str(art),
        "--repo",
        str(tmp_path / "r"),
        "--backend",
        "tensorrt",
        "--plugin",
        str(plugin),
        "--max-batch",
        "512",
    )
    assert small.exit_code == 2 and "profile allows batches up to 256" in small.output
    readme = (tmp_path / "repo_tensorrt" / "README.md").read_text()
    assert "LD_PRELOAD=/repo/plugins/libm4r_trt_plugin_static.so" in readme
    assert "--backend-config=tensorrt,plugins=/repo/plugins/libm4r_trt_plugin_static.so" in readme


def test_inputs_follow_the_manifest(export_dir: Path, tmp_path: Path) -> None:
    """No input list in the generator: a two-input export and a four-input manifest work unchanged."""
    art = tmp_path / "art"
    shutil.copytree(export_dir, art)
    manifest = json.loads((art / "manifest.json").read_text())
    two = manifest["inputs"][:2]
    for inputs in (two, [*manifest["inputs"], {"name": "extra", "dtype": "int64", "shape": ["batch", "n"]}]):
        manifest["inputs"] = inputs
        (art / "manifest.json").write_text(json.dumps(manifest))
        repo = tmp_path / f"repo{len(inputs)}"
        assert run_cli("--artifacts", str(art), "--repo", str(repo), "--with-tokens").exit_code == 0
        cfgs = configs(repo)
        assert [(i.name, i.optional) for i in cfgs[MODEL].input] == [
            (i["name"], i["name"] not in ("item_seq", "item_seq_len")) for i in inputs
        ]
        ens = cfgs[f"{MODEL}_tokens"]
        assert [i.name for i in ens.input] == ["history"] + [f"{i['name']}_tokens" for i in inputs[2:]]
        wired = dict(ens.ensemble_scheduling.step[1].input_map)
        assert wired == {i["name"]: f"_{i['name']}" for i in inputs}


def test_tampered_export_is_refused_and_nothing_is_written(export_dir: Path, tmp_path: Path) -> None:
    art = tmp_path / "art"
    shutil.copytree(export_dir, art)
    data = bytearray((art / "model.onnx").read_bytes())
    data[-1] ^= 1
    (art / "model.onnx").write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["triton", "--artifacts", str(art), "--repo", str(tmp_path / "repo")])
    assert result.exit_code == 3
    assert "model.onnx does not match its sha256" in result.output
    assert sorted(os.listdir(tmp_path)) == ["art"]


def test_failed_run_keeps_the_old_repository_and_leaves_no_staging(
    export_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    assert run_cli("--artifacts", str(export_dir), "--repo", str(repo)).exit_code == 0
    before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    import m4r_export.serve.repository as repository
    from m4r_export.fileio import WriteError

    def broken_write(dst: Path, data: bytes) -> None:
        if dst.name == "model.onnx":
            Path(dst).write_bytes(b"half")
            raise OSError(28, "No space left on device")
        real_write(dst, data)

    real_write = repository._write_file
    monkeypatch.setattr(repository, "_write_file", broken_write)
    with pytest.raises(WriteError, match=r"repo/m4r_topk/1/model.onnx .*No space left on device \(ENOSPC\)"):
        repository.write_repository(export_dir, repo, repository.TritonOptions(with_tokens=True))
    assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["repo"]


def test_usage_errors_are_one_line(export_dir: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    cases = [
        (["--repo", str(foreign)], "was not written by m4r triton"),
        (["--repo", str(tmp_path / "r"), "--backend", "tensorrt", "--kind", "cpu"], "GPUs only"),
        (["--repo", str(tmp_path / "r"), "--backend", "tensorrt"], "needs an engine"),
        (["--repo", str(tmp_path / "r"), "--max-batch", "0"], "--max-batch 0"),
        (
            ["--repo", str(tmp_path / "r"), "--ort-ops", str(tmp_path / "x.so")],
            "only applies to --backend onnxruntime",
        ),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, ["triton", "--artifacts", str(export_dir), *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
    # a head without item ids (scores, embedding) cannot map ids back to tokens
    scores = tmp_path / "scores"
    shutil.copytree(export_dir, scores)
    manifest = json.loads((scores / "manifest.json").read_text())
    manifest["head"], manifest["outputs"] = (
        "scores",
        [{"name": "scores", "dtype": "float32", "shape": ["batch", N_ITEMS]}],
    )
    (scores / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(
        main, ["triton", "--artifacts", str(scores), "--repo", str(tmp_path / "s"), "--with-tokens"]
    )
    assert result.exit_code == 2 and "export with --head topk" in result.output


def test_schema_check_rejects_what_triton_would_reject() -> None:
    from m4r_export.serve import config as cfgmod
    from m4r_export.serve.config import TensorSpec

    x = [TensorSpec("x", "int64", (4,))]
    good = cfgmod.model_config(
        name="m", inputs=x, outputs=x, max_batch=8, backend="python", queue_delay_us=100
    )
    cfgmod.render(good)
    with pytest.raises(M4RError, match="invalid dims"):
        cfgmod.render(
            cfgmod.model_config(
                name="m", inputs=[TensorSpec("x", "int64", (0,))], outputs=x, max_batch=8, backend="python"
            )
        )
    steps = [{"model_name": "missing", "input_map": {"x": "x"}, "output_map": {"x": "x"}}]
    ens = cfgmod.model_config(
        name="e", inputs=x, outputs=x, max_batch=8, platform="ensemble", ensemble_steps=steps
    )
    with pytest.raises(M4RError, match="not in the repository"):
        cfgmod.render(ens, {})
    with pytest.raises(M4RError, match="does not match Triton's model-config schema"):
        cfgmod.parse('name: "m"\nmax_batch_size: 8\ndynamic_batching { max_queue_delay: 3 }\n', "test")


# -------------------------------------------------------------------------------------- real server


def _server_or_skip(repo: Path) -> Any:
    """A started server, or a skip naming why, or a failure when $M4R_REQUIRE_TRITON=1 (CI)."""
    from m4r_export.serve.local import LocalTritonServer, unavailable_reason

    def unavailable(message: str) -> None:
        print(f"SKIP real-server tests: {message}")
        if os.environ.get("M4R_REQUIRE_TRITON") == "1":
            pytest.fail(f"M4R_REQUIRE_TRITON=1 but {message}", pytrace=False)
        pytest.skip(message)

    reason = unavailable_reason()
    if reason:
        unavailable(f"bundled tritonserver unavailable: {reason}")
    try:
        return LocalTritonServer(repo).start()
    except M4RError as exc:
        unavailable(f"bundled tritonserver did not start: {str(exc)[:2000]}")


@pytest.fixture(scope="module")
def server(export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    repo = tmp_path_factory.mktemp("served") / "repo"
    assert (
        run_cli(
            "--artifacts", str(export_dir), "--repo", str(repo), "--with-tokens", "--max-batch", "16"
        ).exit_code
        == 0
    )
    srv = _server_or_skip(repo)
    yield srv
    srv.stop()
    srv.cleanup()


def histories(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(rng.integers(1, N_ITEMS, size=int(rng.integers(1, MAX_SEQ + 1)))) for _ in range(n)]


def padded(hs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    seq = np.zeros((len(hs), MAX_SEQ), np.int64)
    for r, h in enumerate(hs):
        seq[r, : len(h)] = h[-MAX_SEQ:]
    return seq, np.array([[min(len(h), MAX_SEQ)] for h in hs], np.int64)


def torch_topk(
    seq: np.ndarray, lens: np.ndarray, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    serving = ServingModel(_model(), "topk", K)
    ex = None if exclude is None else torch.from_numpy(exclude)
    with torch.no_grad():
        s, i = serving(torch.from_numpy(seq), torch.from_numpy(lens.reshape(-1)), ex)
    return s.numpy(), i.numpy()


def infer(
    client: Any,
    mod: Any,
    seq: np.ndarray,
    lens: np.ndarray,
    model: str = MODEL,
    exclude: np.ndarray | None = None,
) -> Any:
    """One request; ``exclude_items`` only when given (the Python backend fills zeros otherwise)."""
    arrays = {"item_seq": seq, "item_seq_len": lens}
    if exclude is not None:
        arrays["exclude_items"] = exclude
    inputs = []
    for name, arr in arrays.items():
        inputs.append(mod.InferInput(name, list(arr.shape), "INT64"))
        inputs[-1].set_data_from_numpy(arr)
    return client.infer(model, inputs)


def exclusions(n: int, seed: int) -> np.ndarray:
    """[n, 4] lists of items to exclude, 0-padded, some rows empty, some ids out of range (ignored)."""
    rng = np.random.default_rng(seed)
    ex = rng.integers(-2, N_ITEMS + 3, size=(n, 4)).astype(np.int64)
    ex[rng.random((n, 4)) < 0.3] = 0
    ex[::5] = 0
    return ex


def test_http_and_grpc_answers_match_pytorch(server: Any) -> None:
    import tritonclient.grpc as tg
    import tritonclient.http as th

    seq, lens = padded(histories(24))
    ref_scores, ref_items = torch_topk(seq, lens)
    for mod, url in ((th, server.http_url), (tg, server.grpc_url)):
        client = mod.InferenceServerClient(url)
        got_items = []
        for rows in (slice(0, 8), slice(8, 9), slice(9, 24)):  # multi-row and single-row requests
            r = infer(client, mod, seq[rows], lens[rows])
            got_items.append(r.as_numpy("topk_items"))
            np.testing.assert_allclose(r.as_numpy("topk_scores"), ref_scores[rows], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.concatenate(got_items), ref_items)  # fp32: top-10 identical
        # items to exclude: widths 4 and 1 in separate requests, same answers as PyTorch
        ex = exclusions(len(seq), seed=2)
        _, ref_ex = torch_topk(seq, lens, ex)
        assert not np.array_equal(ref_ex, ref_items)  # the exclusion changes the ranking
        r = infer(client, mod, seq[:12], lens[:12], exclude=ex[:12])
        np.testing.assert_array_equal(r.as_numpy("topk_items"), ref_ex[:12])
        r = infer(client, mod, seq[12:13], lens[12:13], exclude=ex[12:13, :1])
        np.testing.assert_array_equal(
            r.as_numpy("topk_items"), torch_topk(seq[12:13], lens[12:13], ex[12:13, :1])[1]
        )
        client.close()


def tokens_request(mod: Any, tokens: list[str], name: str = "history") -> list[Any]:
    arr = np.array([[t.encode() for t in tokens]], dtype=object).reshape(1, len(tokens))
    inp = mod.InferInput(name, list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr)
    return [inp]


def test_token_ensemble_matches_pytorch(server: Any) -> None:
    import tritonclient.grpc as tg
    import tritonclient.http as th

    long = [int(x) for x in np.random.default_rng(3).integers(1, N_ITEMS, size=MAX_SEQ + 7)]
    cases = [(h, []) for h in histories(6, seed=1)] + [(long, []), ([5, 9, 2], ["nope", "[PAD]"])]
    for mod, url in ((th, server.http_url), (tg, server.grpc_url)):
        client = mod.InferenceServerClient(url)
        for n, (ids, unknown) in enumerate(cases):
            tokens = [f"tok{i}" for i in ids[:1]] + unknown + [f"tok{i}" for i in ids[1:]]
            request = tokens_request(mod, tokens)
            seq, lens = padded([ids[-MAX_SEQ:]])
            exclude = None
            if n % 2:  # every other user also sends items to exclude (one unknown token, dropped)
                top = torch_topk(seq, lens)[1][0]
                exclude = np.array([[top[0], top[3], 0]], np.int64)
                request += tokens_request(
                    mod, [f"tok{top[0]}", "nope", f"tok{top[3]}"], "exclude_items_tokens"
                )
            r = client.infer(f"{MODEL}_tokens", request)
            ref_scores, ref_items = torch_topk(seq, lens, exclude)
            expected = [f"tok{i}".encode() for i in ref_items[0]]
            assert list(r.as_numpy("item_tokens")[0]) == expected
            np.testing.assert_allclose(r.as_numpy("topk_scores"), ref_scores, rtol=1e-5, atol=1e-5)
            assert int(r.as_numpy("unknown_tokens")[0, 0]) == len(unknown)
        client.close()


def test_bounded_load_forms_batches_without_errors(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    import tritonclient.grpc as tg

    clients, per_client = 16, 50
    pool = histories(64, seed=7)
    seq, lens = padded(pool)
    ex = exclusions(len(pool), seed=8)
    _, ref_plain = torch_topk(seq, lens)
    _, ref_ex = torch_topk(seq, lens, ex)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(c: int) -> None:
        client = tg.InferenceServerClient(server.grpc_url)
        for j in range(per_client):
            row = (c * per_client + j) % len(pool)
            t0 = time.perf_counter()
            try:
                if c % 2:  # odd clients send items to exclude, widths 1..4 (zero-padded lists)
                    width = 1 + j % 4
                    width = max(width, int(np.max(np.nonzero(ex[row])[0], initial=-1)) + 1)
                    r = infer(
                        client, tg, seq[row : row + 1], lens[row : row + 1], exclude=ex[row : row + 1, :width]
                    )
                    expected = ref_ex[row]
                else:
                    r = infer(client, tg, seq[row : row + 1], lens[row : row + 1])
                    expected = ref_plain[row]
                ok = np.array_equal(r.as_numpy("topk_items")[0], expected)
                msg = None if ok else f"request {row}: wrong top-10"
            except Exception as exc:  # every failure is counted, none aborts the load
                msg = str(exc)
            with lock:
                latencies.append(time.perf_counter() - t0)
                if msg:
                    errors.append(msg)
        client.close()

    before = _batch_counts(server)
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    formed = _batches_formed(server, before, clients * per_client)
    p50, p99 = np.percentile(np.array(latencies) * 1e3, [50, 99])
    with capsys.disabled():  # shown in CI logs too (the issue asks for these numbers)
        print(
            f"\nload: {clients} clients x {per_client} requests, {len(errors)} errors, {wall:.1f} s, "
            f"{clients * per_client / wall:.0f} req/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
            f"batches formed (size: count) {dict(sorted(formed.items()))}"
        )
    assert errors == []
    assert len(latencies) == clients * per_client
    assert sum(b * n for b, n in formed.items()) == clients * per_client
    assert any(b > 1 for b in formed), f"the dynamic batcher formed no batch > 1: {formed}"


def _batches_formed(server: Any, before: dict[int, int], requests: int) -> dict[int, int]:
    """Batch size -> batches formed since ``before``. Triton updates its statistics after it has sent
    the responses, so the last batch may be counted a moment after its client got the answer (seen
    once in CI: 799 of 800 requests counted): poll for up to 10 s until every request is counted."""
    deadline = time.monotonic() + 10.0
    while True:
        after = _batch_counts(server)
        formed = {b: after.get(b, 0) - before.get(b, 0) for b in after if after.get(b, 0) > before.get(b, 0)}
        if sum(b * n for b, n in formed.items()) >= requests or time.monotonic() > deadline:
            return formed
        time.sleep(0.1)


def _batch_counts(server: Any) -> dict[int, int]:
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(server.grpc_url)
    stats = client.get_inference_statistics(model_name=MODEL, as_json=True)
    client.close()
    model = stats["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in model.get("batch_stats", [])}


def test_bad_requests_get_clear_answers_and_the_server_keeps_serving(
    server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    client = th.InferenceServerClient(server.http_url)
    seq, lens = padded([[3, 4, 5]])
    replies: dict[str, str] = {}

    def rejected(kind: str, inputs: list[Any], model: str = MODEL) -> str:
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, inputs)
        replies[kind] = str(info.value)
        return replies[kind]

    def raw(name: str, arr: np.ndarray, dtype: str) -> Any:
        inp = th.InferInput(name, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        return inp

    lens_in = raw("item_seq_len", lens, "INT64")
    msg = rejected("wrong dtype", [raw("item_seq", seq.astype(np.int32), "INT32"), lens_in])
    assert "'item_seq' data-type is 'INT32'" in msg and "expects 'INT64'" in msg
    msg = rejected("wrong rank", [raw("item_seq", seq[:, :, None], "INT64"), lens_in])
    assert (
        "unexpected shape for input 'item_seq'" in msg
        and f"Expected [-1,{MAX_SEQ}], got [1,{MAX_SEQ},1]" in msg
    ), msg
    too_long = np.ones((1, MAX_SEQ + 3), np.int64)
    msg = rejected("too-long sequence", [raw("item_seq", too_long, "INT64"), lens_in])
    assert (
        "unexpected shape for input 'item_seq'" in msg
        and f"Expected [-1,{MAX_SEQ}], got [1,{MAX_SEQ + 3}]" in msg
    ), msg
    msg = rejected(
        "unknown tokens only (tokens)", tokens_request(th, ["nope", "also-nope"]), f"{MODEL}_tokens"
    )
    assert "none of the 2 tokens in history is a known item" in msg, msg
    msg = rejected(
        "empty history (tokens)", [raw("history", np.zeros((1, 0), dtype=object), "BYTES")], f"{MODEL}_tokens"
    )
    assert "history is empty" in msg, msg

    # documented handling (same as the exported graph on every backend): out-of-range ids are
    # padding, and an empty history (length 0) is read as length 1
    bad_ids = seq.copy()
    bad_ids[0, 1] = N_ITEMS + 5
    bad_ids[0, 2] = -3
    zeroed = seq.copy()
    zeroed[0, 1:3] = 0
    r = infer(client, th, bad_ids, lens)
    np.testing.assert_array_equal(r.as_numpy("topk_items"), torch_topk(zeroed, lens)[1])
    replies["out-of-range ids"] = f"served as padding: top-10 {r.as_numpy('topk_items')[0].tolist()}"
    empty = np.zeros((1, MAX_SEQ), np.int64)
    r = infer(client, th, empty, np.zeros((1, 1), np.int64))
    np.testing.assert_array_equal(r.as_numpy("topk_items"), torch_topk(empty, np.ones((1, 1), np.int64))[1])
    replies["empty history (ids)"] = "served as length 1 (documented clamp)"
    with capsys.disabled():
        print("\n" + "\n".join(f"bad request [{k}] -> {v}" for k, v in replies.items()))

    # still serving, correctly
    r = infer(client, th, seq, lens)
    np.testing.assert_array_equal(r.as_numpy("topk_items"), torch_topk(seq, lens)[1])
    assert client.is_server_live() and client.is_model_ready(MODEL)
    client.close()


def test_server_without_tokens_serves_and_shuts_down_cleanly(export_dir: Path, tmp_path: Path) -> None:
    import tritonclient.http as th

    repo = tmp_path / "repo"
    assert run_cli("--artifacts", str(export_dir), "--repo", str(repo), "--name", "plain").exit_code == 0
    srv = _server_or_skip(repo)
    try:
        client = th.InferenceServerClient(srv.http_url)
        seq, lens = padded(histories(3, seed=5))
        r = infer(client, th, seq, lens, model="plain")
        np.testing.assert_array_equal(r.as_numpy("topk_items"), torch_topk(seq, lens)[1])
        client.close()
    finally:
        code = srv.stop()
        log = srv.log()
        srv.cleanup()
    assert code == 0, log[-2000:]
    pid = srv.proc.pid
    leftovers = [p for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == pid]
    assert leftovers == [], f"processes left behind in the server's group: {leftovers}"


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def test_bundled_server_refuses_numpy2_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundled stub returns empty tensors under numpy 2: the tests must skip saying so, not fail."""
    import numpy

    from m4r_export.serve import local

    monkeypatch.setattr(local, "_dist", lambda: (Path("/"), Path("/"), Path("/")))
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    assert "install numpy<2" in (local.unavailable_reason() or "")
    with pytest.raises(M4RError, match="cannot start the bundled tritonserver: .*numpy 2.4.6"):
        local.LocalTritonServer("/nonexistent").start()


def test_server_failure_names_the_first_error_line(tmp_path: Path) -> None:
    """A model that cannot load: the error's first line is the log's first real error (not the options)."""
    from m4r_export.serve.local import LocalTritonServer, unavailable_reason

    if unavailable_reason():
        _server_or_skip(tmp_path)  # skips, or fails under $M4R_REQUIRE_TRITON=1
    model = tmp_path / "repo" / "broken"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text("import m4r_no_such_module_xyz\n")
    (model / "config.pbtxt").write_text(
        'backend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "x", data_type: TYPE_FP32, dims: [ 1 ] } ]\n'
        'output [ { name: "y", data_type: TYPE_FP32, dims: [ 1 ] } ]\n'
    )
    with pytest.raises(M4RError) as info:
        LocalTritonServer(tmp_path / "repo", startup_timeout_s=60).start()
    first = str(info.value).splitlines()[0]
    assert "tritonserver exited with code 1" in first
    assert "No module named 'm4r_no_such_module_xyz'" in first and "CudaDriverHelper" not in first


def test_stub_python_sees_this_interpreters_packages(tmp_path: Path) -> None:
    """The stub's venv rebuilds this interpreter's sys.path with no PYTHONPATH (the stub ignores it)."""
    import subprocess
    import sys

    from m4r_export.serve.local import _stub_python

    bindir = _stub_python(tmp_path / "py")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    code = "import sys, numpy, m4r_export, tritonclient; print(sys.prefix)"
    cmd = [str(bindir / "python3"), "-c", code]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "py") and sys.prefix != str(tmp_path / "py")
