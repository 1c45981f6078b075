"""``m4r triton --streaming``: configs checked against Triton's schema, and the Python-backend
stateful model against the real bundled ``tritonserver`` (sequence batcher, START/END, idle reclaim).

Every streamed response is compared with a full re-encode of that user's history so far by the
PyTorch model. ONNX Runtime / TensorRT implicit-state configs are only schema-checked here (the
bundled server has the Python backend only).
"""

from __future__ import annotations

import functools
import json
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
from m4r_export.onnx.export import ExportOptions, export_artifacts
from m4r_export.serving import ServingModel
from m4r_export.verify.testing import tiny_model

pb = import_or_skip(
    "tritonclient.grpc.model_config_pb2", "M4R_REQUIRE_TRITON", "tritonclient is not installed"
)
text_format = import_or_skip("google.protobuf.text_format", "M4R_REQUIRE_TRITON", "protobuf is not installed")

K, MAX_SEQ, N_ITEMS = 10, 12, 40
MODEL = "m4r_topk_streaming"
IDLE_S = 4.0  # the server's max_sequence_idle_microseconds in these tests


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export")
    opts = ExportOptions(head="topk", k=K, max_seq_len=MAX_SEQ, streaming=True)
    export_artifacts(tiny_model(N_ITEMS), out, opts, build_trt=False)
    return out


def run_cli(*args: str) -> Any:
    return CliRunner().invoke(main, ["triton", "--streaming", *args], catch_exceptions=False)


def parse(path: Path) -> Any:
    return text_format.Parse(path.read_text(), pb.ModelConfig())


def test_configs_parse_against_tritons_schema(export_dir: Path, tmp_path: Path) -> None:
    manifest = json.loads((export_dir / "manifest.json").read_text())
    states = manifest["streaming"]["states"]
    step_inputs = {i["name"]: i for i in manifest["streaming"]["step"]["inputs"]}

    repo = tmp_path / "py"
    result = run_cli("--artifacts", str(export_dir), "--repo", str(repo), "--max-batch", "8")
    assert result.exit_code == 0, result.output
    py = parse(repo / MODEL / "config.pbtxt")
    assert py.backend == "python" and not py.HasField("dynamic_batching")
    sb = py.sequence_batching
    kinds = {c.name: c.control[0].kind for c in sb.control_input}
    assert kinds == {
        "START": pb.ModelSequenceBatching.Control.CONTROL_SEQUENCE_START,
        "END": pb.ModelSequenceBatching.Control.CONTROL_SEQUENCE_END,
        "CORRID": pb.ModelSequenceBatching.Control.CONTROL_SEQUENCE_CORRID,
    }
    assert sb.max_sequence_idle_microseconds == 60_000_000 and sb.oldest.max_candidate_sequences == 1024
    # the largest accepted request is stated in the config (issue 20 item 4)
    assert py.parameters["max_request_events"].string_value == "262144"
    assert "At most 262144 ids per request" in (repo / "README.md").read_text()
    assert [(i.name, list(i.dims), i.optional) for i in py.input] == [
        ("item_ids", [-1], False),
        ("exclude_items", [-1], True),
    ]
    assert [(o.name, list(o.dims)) for o in py.output] == [("topk_scores", [K]), ("topk_items", [K])]
    # the version folder is a checked export of its own (StreamingSession.from_dir loads it)
    from m4r_export.integrity import check_artifact_files

    assert set(check_artifact_files(repo / MODEL / "1")["files"]) == {
        "model.onnx",
        "items.txt",
        "init.onnx",
        "step.onnx",
    }

    repo = tmp_path / "ort"
    args = ("--artifacts", str(export_dir), "--repo", str(repo), "--backend", "onnxruntime")
    assert run_cli(*args, "--sequence-idle-us", "5000").exit_code == 0
    ort = parse(repo / MODEL / "config.pbtxt")
    assert ort.platform == "onnxruntime_onnx" and ort.sequence_batching.max_sequence_idle_microseconds == 5000
    assert (repo / MODEL / "1" / "model.onnx").read_bytes() == (export_dir / "step.onnx").read_bytes()
    assert [(i.name, list(i.dims), list(i.reshape.shape)) for i in ort.input][0] == ("item_id", [1], [])
    got = [(s.input_name, s.output_name, list(s.dims)) for s in ort.sequence_batching.state]
    want = [(s["step_input"], s["output"], step_inputs[s["step_input"]]["shape"][1:]) for s in states]
    assert got == want and len(got) == 3
    for s in ort.sequence_batching.state:
        assert s.data_type == pb.TYPE_FP32
        (init,) = s.initial_state
        assert init.zero_data and list(init.dims) == list(s.dims)
    assert not ort.sequence_batching.control_input  # step.onnx takes no control tensors

    # tensorrt: an engine built from step.onnx (stand-in bytes + engine manifest)
    from m4r_export.fileio import sha256_file

    art = tmp_path / "art"
    shutil.copytree(export_dir, art)
    (art / "step.plan").write_bytes(b"not a real engine")
    meta = {
        "format": "m4r-trt-engine/1",
        "engine": "step.plan",
        "engine_sha256": sha256_file(art / "step.plan"),
        "onnx": {"file": "step.onnx", "sha256": sha256_file(art / "step.onnx")},
        "profile": {"batch": [1, 64, 256], "seq": [1, 1, 1]},
    }
    (art / "step.plan.json").write_text(json.dumps(meta))
    plugin = tmp_path / "libm4r_trt_plugin_static.so"
    plugin.write_bytes(b"\x7fELF")
    args = ("--artifacts", str(art), "--backend", "tensorrt", "--plugin", str(plugin))
    assert run_cli(*args, "--repo", str(tmp_path / "trt"), "--engine", "step.plan").exit_code == 0
    trt = parse(tmp_path / "trt" / MODEL / "config.pbtxt")
    assert trt.platform == "tensorrt_plan" and len(trt.sequence_batching.state) == 3
    missing = run_cli(*args, "--repo", str(tmp_path / "trt2"))
    assert missing.exit_code == 2 and "needs an engine built from the step graph" in missing.output


def test_usage_errors(export_dir: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    opts = ExportOptions(head="topk", k=K, max_seq_len=MAX_SEQ)
    export_artifacts(tiny_model(N_ITEMS), plain, opts, build_trt=False)
    r = run_cli("--artifacts", str(plain), "--repo", str(tmp_path / "r"))
    assert r.exit_code == 2 and "no 'streaming' section" in r.output and "m4r export --streaming" in r.output
    r = run_cli("--artifacts", str(export_dir), "--repo", str(tmp_path / "r"), "--with-tokens")
    assert r.exit_code == 2 and "--streaming with --with-tokens" in r.output
    assert not (tmp_path / "r").exists()


# -------------------------------------------------------------------------------------- real server


@pytest.fixture(scope="module")
def server(export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from test_triton import _server_or_skip

    repo = tmp_path_factory.mktemp("served") / "repo"
    idle = str(int(IDLE_S * 1e6))
    args = (
        "--artifacts",
        str(export_dir),
        "--repo",
        str(repo),
        "--max-batch",
        "8",
        "--max-request-events",
        "40",
    )
    assert run_cli(*args, "--sequence-idle-us", idle).exit_code == 0
    srv = _server_or_skip(repo)
    yield srv
    srv.stop()
    srv.cleanup()


@functools.cache
def serving_model() -> ServingModel:
    return ServingModel(tiny_model(N_ITEMS), "topk", K)  # built once: tiny_model seeds torch's global RNG


def reference(history: list[int], exclude: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Full re-encode of ``history`` (<= MAX_SEQ items) by the PyTorch serving model."""
    serving = serving_model()
    seq = torch.zeros((1, MAX_SEQ), dtype=torch.int64)
    seq[0, : len(history)] = torch.tensor(history)
    ex = None if exclude is None else torch.tensor([exclude])
    with torch.no_grad():
        s, i = serving(seq, torch.tensor([max(1, len(history))]), ex)
    return s.numpy(), i.numpy()


def send(
    client: Any,
    corrid: int,
    items: list[int],
    *,
    start: bool = False,
    end: bool = False,
    exclude: list[int] | None = None,
) -> Any:
    import tritonclient.http as th

    inputs = []
    for name, values in (("item_ids", items), ("exclude_items", exclude)):
        if values is not None:
            arr = np.array([values], dtype=np.int64).reshape(1, -1)
            inputs.append(th.InferInput(name, list(arr.shape), "INT64"))
            inputs[-1].set_data_from_numpy(arr)
    return client.infer(MODEL, inputs, sequence_id=corrid, sequence_start=start, sequence_end=end)


def test_concurrent_sequences_match_a_full_reencode(server: Any) -> None:
    """8 users stream at once (START with a history, then 1-3 new events per request, END)."""
    import tritonclient.http as th

    serving_model()
    errors: list[str] = []
    checked = [0]

    def user(corrid: int) -> None:
        client = th.InferenceServerClient(server.http_url)
        rng = np.random.default_rng(corrid)
        try:
            history = [int(x) for x in rng.integers(1, N_ITEMS, size=int(corrid % 4))]
            chunks = [
                [int(x) for x in rng.integers(1, N_ITEMS, size=int(rng.integers(1, 4)))] for _ in range(3)
            ]
            r = send(client, corrid, history, start=True)
            for n, chunk in enumerate([None, *chunks]):
                if chunk is not None:
                    history += chunk
                    r = send(client, corrid, chunk, end=n == len(chunks))
                s, i = reference(history)
                if not np.array_equal(r.as_numpy("topk_items"), i) or not np.allclose(
                    r.as_numpy("topk_scores"), s, atol=1e-5
                ):
                    errors.append(f"sequence {corrid} after {history}: {r.as_numpy('topk_items')} != {i}")
                checked[0] += 1
        except Exception as exc:  # collected: an assert in a thread would be lost
            errors.append(f"sequence {corrid}: {exc}")
        finally:
            client.close()

    threads = [threading.Thread(target=user, args=(c,)) for c in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, "\n".join(errors)
    assert checked[0] == 8 * 4
    # END freed the state: continuing a finished sequence is refused
    client = th.InferenceServerClient(server.http_url)
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="START"):
        send(client, 3, [5])
    client.close()


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(
    server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    client = th.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException) as info:
        send(client, 101, [4, 5])  # no START first
    assert "START" in str(info.value), info.value
    replies = {"no START first": str(info.value)}
    wrong = np.array([[4, 5]], dtype=np.int32)
    inp = th.InferInput("item_ids", list(wrong.shape), "INT32")
    inp.set_data_from_numpy(wrong)
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, [inp], sequence_id=102, sequence_start=True)
    assert "'item_ids' data-type is 'INT32'" in str(info.value) and "INT64" in str(info.value)
    replies["wrong dtype"] = str(info.value)
    with pytest.raises(InferenceServerException) as info:
        send(client, 105, [3] * 41, start=True)  # above --max-request-events 40
    assert "41 ids in one request, above max_request_events=40" in str(info.value), info.value
    replies["too many ids"] = str(info.value)
    with capsys.disabled():
        print("\n" + "\n".join(f"bad request [{k}] -> {v}" for k, v in replies.items()))
    # still serving, correctly
    r = send(client, 103, [4, 5], start=True)
    r = send(client, 103, [6], end=True)
    np.testing.assert_array_equal(r.as_numpy("topk_items"), reference([4, 5, 6])[1])
    # exclude_items applies to one reply (ranking heads); out-of-range ids in item_ids are skipped
    top = [int(x) for x in reference([4, 5, 6])[1][0, :3]]
    send(client, 104, [4, 5], start=True)
    r = send(client, 104, [N_ITEMS + 7, 6, -2], exclude=top)
    np.testing.assert_array_equal(r.as_numpy("topk_items"), reference([4, 5, 6], top)[1])
    assert not set(top) & set(r.as_numpy("topk_items")[0].tolist())
    r = send(client, 104, [], end=True)  # no new event, nothing excluded: the plain history's answer
    np.testing.assert_array_equal(r.as_numpy("topk_items"), reference([4, 5, 6])[1])
    assert client.is_server_live() and client.is_model_ready(MODEL)
    client.close()


def test_a_sequence_without_end_is_reclaimed_after_the_idle_timeout(server: Any) -> None:
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    client = th.InferenceServerClient(server.http_url)
    send(client, 200, [7, 8], start=True)
    send(client, 200, [9])  # never ends
    send(client, 202, [7, 8], start=True)
    send(client, 202, [9], end=True)  # ends: the model frees its state at once
    time.sleep(IDLE_S + 1.5)
    with pytest.raises(InferenceServerException, match="START"):
        send(client, 200, [10])  # Triton reclaimed the sequence
    # the model dropped its state too (checked on its next call; logged)
    send(client, 201, [1], start=True, end=True)
    deadline = time.monotonic() + 10
    while "dropped the state of sequence 200" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "dropped the state of sequence 200" in server.log()
    assert "dropped the state of sequence 202" not in server.log()  # END freed it already
    # and the same id can start afresh: its answers are those of the new history only
    r = send(client, 200, [3], start=True, end=True)
    np.testing.assert_array_equal(r.as_numpy("topk_items"), reference([3])[1])
    client.close()
