"""Streaming: init.onnx/step.onnx equal a full re-encode; skip, long histories, manifest, helper, docs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from m4r_export.checkpoint import save_checkpoint
from m4r_export.cli import main
from m4r_export.errors import UsageError
from m4r_export.model import Mamba4Rec
from m4r_export.onnx import exclude_inputs
from m4r_export.onnx import export as ex
from m4r_export.onnx.streaming import trace_streaming
from m4r_export.serving import HEAD_OUTPUTS, ServingModel, state_names
from m4r_export.streaming import StreamingSession

N_ITEMS = 40
MAX_SEQ = 12
REPO = Path(__file__).resolve().parents[1]


def tiny_model(num_layers: int = 1, seed: int = 0) -> Mamba4Rec:
    torch.manual_seed(seed)
    model = Mamba4Rec(N_ITEMS, hidden_size=16, num_layers=num_layers, d_state=8).eval()
    with torch.no_grad():  # a non-trivial ranking, and dt large enough that old events matter little
        model.item_embedding.weight.normal_(0, 1.0)
    model.item_tokens = ["[PAD]"] + [f"i{i}" for i in range(1, N_ITEMS)]
    return model


class Graphs:
    """init/step ORT sessions of one export, plus the PyTorch reference of the same model."""

    def __init__(self, model: Mamba4Rec, head: str, init: Any, step: Any, k: int = 5) -> None:
        self.model, self.head, self.k = model, head, k
        self.heads = list(HEAD_OUTPUTS[head])
        self.states = state_names(model.config.num_layers)
        self.init = ort.InferenceSession(init, providers=["CPUExecutionProvider"])
        self.step = ort.InferenceSession(step, providers=["CPUExecutionProvider"])
        self.takes_exclude = "exclude_items" in [i.name for i in self.step.get_inputs()]

    def _excl(self, exclude: list[list[int]] | None, batch: int) -> dict[str, np.ndarray]:
        return {"exclude_items": exclude_inputs(exclude or [], batch)} if self.takes_exclude else {}

    def start(
        self, histories: list[list[int]], exclude: list[list[int]] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        width = max(1, max(len(h) for h in histories))
        seq = np.zeros((len(histories), width), dtype=np.int64)
        for r, h in enumerate(histories):
            seq[r, : len(h)] = h
        lens = np.array([len(h) for h in histories], dtype=np.int64)
        feeds = {"item_seq": seq, "item_seq_len": lens, **self._excl(exclude, len(histories))}
        return self._split(self.init, self.init.run(None, feeds))

    def push(
        self, states: dict[str, np.ndarray], ids: list[int], exclude: list[list[int]] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        feeds = {"item_id": np.array(ids, dtype=np.int64), **self._excl(exclude, len(ids)), **states}
        return self._split(self.step, self.step.run(None, feeds))

    def _split(self, sess: Any, outs: list[np.ndarray]) -> tuple[dict[str, Any], dict[str, Any]]:
        got = dict(zip([o.name for o in sess.get_outputs()], outs, strict=True))
        return {n: got[n] for n in self.heads}, {i: got[o] for i, o, _, _ in self.states}

    def reference(
        self, histories: list[list[int]], exclude: list[list[int]] | None = None
    ) -> dict[str, np.ndarray]:
        """Full re-encode with the fp32 PyTorch ServingModel (no truncation)."""
        width = max(len(h) for h in histories)
        seq = np.zeros((len(histories), width), dtype=np.int64)
        for r, h in enumerate(histories):
            seq[r, : len(h)] = h
        serving = ServingModel(self.model, self.head, self.k)
        with torch.no_grad():
            excl = torch.from_numpy(exclude_inputs(exclude, len(histories))) if exclude else None
            outs = serving(torch.from_numpy(seq), torch.tensor([len(h) for h in histories]), excl)
        return {n: o.numpy() for n, o in zip(self.heads, outs, strict=True)}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Mamba4Rec]:
    """`m4r export --streaming --fp16`, scores head, one layer, through the CLI."""
    d = tmp_path_factory.mktemp("stream")
    model = tiny_model()
    save_checkpoint(d / "model.pt", model, model.item_tokens, {"max_seq_len": MAX_SEQ})
    res = CliRunner().invoke(
        main,
        [
            "export",
            "--ckpt",
            str(d / "model.pt"),
            "--out-dir",
            str(d / "out"),
            "--streaming",
            "--fp16",
            "--no-trt",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "streaming parity fp32" in res.output
    return d / "out", model


@pytest.fixture(scope="module")
def graphs(export_dir: tuple[Path, Mamba4Rec]) -> dict[str, Graphs]:
    """Every head: scores from the CLI export (1 layer); topk with 2 layers; embedding with 3 layers."""
    out_dir, model = export_dir
    g = {"scores": Graphs(model, "scores", str(out_dir / "init.onnx"), str(out_dir / "step.onnx"))}
    for head, layers in (("topk", 2), ("embedding", 3)):
        m = tiny_model(layers, seed=layers)
        init, step = trace_streaming(m, ex.ExportOptions(head=head, k=5, max_seq_len=MAX_SEQ))
        g[head] = Graphs(m, head, init.SerializeToString(), step.SerializeToString())
    return g


def assert_same(
    head: str, ref: dict[str, np.ndarray], got: dict[str, np.ndarray], atol: float = 1e-5
) -> None:
    if head == "topk":
        np.testing.assert_array_equal(got["topk_items"], ref["topk_items"])
    for name, r in ref.items():
        if r.dtype.kind == "f":
            np.testing.assert_allclose(got[name], r, atol=atol, rtol=0)


RNG = np.random.default_rng(7)
PREFIXES = [list(RNG.integers(1, N_ITEMS, n)) for n in (5, 1, 0, 12, 3)]  # ragged, one empty
EVENTS = RNG.integers(1, N_ITEMS, size=(6, len(PREFIXES))).tolist()


@pytest.mark.parametrize("head", ["scores", "topk", "embedding"])
def test_init_then_steps_equal_full_reencode(graphs: dict[str, Graphs], head: str) -> None:
    g = graphs[head]
    histories = [[int(i) for i in h] for h in PREFIXES]
    outs, states = g.start(histories)
    nonempty = [r for r, h in enumerate(histories) if h]
    ref = g.reference([h or [0] for h in histories])  # an empty history scores like the model's len-0 input
    assert_same(head, {k: v[nonempty] for k, v in ref.items()}, {k: v[nonempty] for k, v in outs.items()})
    for ids in EVENTS:
        outs, states = g.push(states, ids)
        for h, i in zip(histories, ids, strict=True):
            h.append(i)
        assert_same(head, g.reference(histories), outs)


@pytest.mark.parametrize("head", ["scores", "topk"])
def test_out_of_range_ids_are_skipped(graphs: dict[str, Graphs], head: str) -> None:
    g = graphs[head]
    histories = [[3, 5, 7], [9], [2, 2, 4, 6]]
    outs, states = g.start(histories)
    skipped_outs, skipped_states = g.push(states, [N_ITEMS, -1, 0])
    for name in states:
        np.testing.assert_array_equal(skipped_states[name], states[name])
    for name in outs:
        np.testing.assert_array_equal(skipped_outs[name], outs[name])
    # mixed batch: row 1 skips, the others advance; the next event continues from the right state
    outs, states = g.push(skipped_states, [11, N_ITEMS + 7, 13])
    outs, states = g.push(states, [17, 19, 0])
    assert_same(head, g.reference([[3, 5, 7, 11, 17], [9, 19], [2, 2, 4, 6, 13]]), outs)


@pytest.mark.parametrize("head", ["scores", "topk"])
def test_exclude_items_in_init_and_step(graphs: dict[str, Graphs], head: str) -> None:
    g = graphs[head]
    assert g.takes_exclude
    histories = [[3, 5, 7], [9, 2]]
    exclude = [[3, 5, 7, 11], [1, 2, 4, 6, 8, 9, 10]]
    outs, states = g.start(histories, exclude)
    assert_same(head, g.reference(histories, exclude), outs)
    outs, states = g.push(states, [11, 0], exclude)
    assert_same(head, g.reference([[3, 5, 7, 11], [9, 2]], exclude), outs)
    if head == "scores":
        assert np.isneginf(outs["scores"][1, exclude[1]]).all()
    # exclusions are per call, not kept: the next call without them ranks everything again
    outs, _ = g.push(states, [0, 0])
    assert_same(head, g.reference([[3, 5, 7, 11], [9, 2]]), outs)


def test_history_longer_than_max_seq_len_equals_whole_history(graphs: dict[str, Graphs]) -> None:
    g = graphs["scores"]
    history = [int(i) for i in np.random.default_rng(3).integers(1, N_ITEMS, 70)]
    outs, states = g.start([history[:40]])  # init itself already exceeds max_seq_len (12)
    for i in history[40:]:
        outs, states = g.push(states, [i])
    assert_same("scores", g.reference([history]), outs)  # the whole history, not its last 12 items


def test_fp16_graphs_rank_like_fp32(export_dir: tuple[Path, Mamba4Rec], graphs: dict[str, Graphs]) -> None:
    out_dir, model = export_dir
    g16 = Graphs(model, "scores", str(out_dir / "init.fp16.onnx"), str(out_dir / "step.fp16.onnx"))
    for spec in g16.init.get_outputs()[1:] + g16.step.get_outputs()[1:]:
        assert spec.type == "tensor(float)", spec.name  # states stay fp32
    histories = [[int(i) for i in h] for h in PREFIXES if h]
    _, states = g16.start(histories)
    overlaps = []
    for row in EVENTS:
        ids = row[: len(histories)]
        outs, states = g16.push(states, ids)
        for h, i in zip(histories, ids, strict=True):
            h.append(i)
        ref = graphs["scores"].reference(histories)["scores"]
        top_ref = np.argsort(-ref, axis=1)[:, :10]
        top_got = np.argsort(-outs["scores"], axis=1)[:, :10]
        overlaps += [
            len(set(a) & set(b)) / 10 for a, b in zip(top_ref.tolist(), top_got.tolist(), strict=True)
        ]
    assert np.mean(overlaps) >= 0.9


def test_graph_structure(export_dir: tuple[Path, Mamba4Rec], graphs: dict[str, Graphs]) -> None:
    out_dir, _ = export_dir
    step = onnx.load(out_dir / "step.onnx")
    init = onnx.load(out_dir / "init.onnx")
    assert {n.domain for n in step.graph.node} <= {"", "ai.onnx"} and not step.functions
    assert not any(n.op_type == "SelectiveScan" for n in init.graph.node)  # 1 layer: closed form only
    m = tiny_model(2, seed=2)
    init2, step2 = trace_streaming(m, ex.ExportOptions(max_seq_len=MAX_SEQ))
    assert [n.op_type for n in init2.graph.node if n.domain == "m4r"] == [
        "SelectiveScan"
    ]  # layer 0, mode all
    assert [f.name for f in init2.functions] == ["SelectiveScan"]
    assert not any(n.domain == "m4r" for n in step2.graph.node)


def test_manifest_streaming_section(export_dir: tuple[Path, Mamba4Rec]) -> None:
    out_dir, model = export_dir
    manifest = json.loads((out_dir / "manifest.json").read_text())
    s = manifest["streaming"]
    assert s["files"] == {
        "fp32": {"init": "init.onnx", "step": "step.onnx"},
        "fp16": {"init": "init.fp16.onnx", "step": "step.fp16.onnx"},
    }
    for name in ("init.onnx", "step.onnx", "init.fp16.onnx", "step.fp16.onnx"):
        assert manifest["files"][name]["bytes"] == (out_dir / name).stat().st_size
    d_inner = 2 * 16
    for kind in ("init", "step"):
        proto = onnx.load(out_dir / f"{kind}.onnx")
        for io, vis in (("inputs", proto.graph.input), ("outputs", proto.graph.output)):
            assert [t["name"] for t in s[kind][io]] == [v.name for v in vis]
    roles = {t["name"]: (t["role"], t["layer"], t["dtype"], t["shape"]) for t in s["step"]["inputs"]}
    assert roles == {
        "item_id": ("item_ids", None, "int64", ["batch"]),
        "exclude_items": ("exclude_items", None, "int64", ["batch", "exclude"]),
        "conv_state_0": ("conv_state", 0, "float32", ["batch", d_inner, 3]),
        "ssm_state_0": ("ssm_state", 0, "float32", ["batch", d_inner, 8]),
        "user_state": ("user_state", None, "float32", ["batch", 16]),
    }
    init_roles = [(t["name"], t["role"]) for t in s["init"]["inputs"] + s["init"]["outputs"]]
    assert init_roles[:4] == [
        ("item_seq", "item_ids"),
        ("item_seq_len", "lengths"),
        ("exclude_items", "exclude_items"),
        ("scores", "head_output"),
    ]
    assert {(p["step_input"], p["output"]) for p in s["states"]} == {
        ("conv_state_0", "conv_state_0_out"),
        ("ssm_state_0", "ssm_state_0_out"),
        ("user_state", "user_state_out"),
    }
    assert s["parity"]["fp32"]["passed"] and s["parity"]["fp32"]["max_abs_diff"] <= 1e-5


def test_session_helper_matches_full_reencode(
    export_dir: tuple[Path, Mamba4Rec], graphs: dict[str, Graphs]
) -> None:
    out_dir, _ = export_dir
    session = StreamingSession.from_dir(out_dir)
    histories = [[3, 5, N_ITEMS + 2, 7], [], [11]]  # the out-of-range id is dropped by start()
    session.start(histories)
    out = session.push([13, 17, 0])
    ref = graphs["scores"].reference([[3, 5, 7, 13], [17], [11]])
    np.testing.assert_allclose(out["scores"], ref["scores"], atol=1e-5, rtol=0)
    saved = session.states
    session.push([19, 19, 19])
    session.load_states(saved)  # rewind
    np.testing.assert_allclose(session.push([0, 0, 0])["scores"], ref["scores"], atol=1e-5, rtol=0)


def test_session_rejects_bad_states_and_ids(export_dir: tuple[Path, Mamba4Rec]) -> None:
    session = StreamingSession.from_dir(export_dir[0])
    with pytest.raises(UsageError, match="start"):
        session.push([1])
    session.start([[1, 2], [3]])
    good = session.states
    bad_cases = {
        "NaN": {**good, "ssm_state_0": np.full_like(good["ssm_state_0"], np.nan)},
        "dtype float64": {**good, "conv_state_0": good["conv_state_0"].astype(np.float64)},
        r"shape \[2, 32, 5\]": {**good, "ssm_state_0": np.zeros((2, 32, 5), np.float32)},
        "batch 2": {**good, "user_state": np.zeros((3, 16), np.float32)},
        "missing: ssm_state_0": {k: v for k, v in good.items() if k != "ssm_state_0"},
    }
    for message, states in bad_cases.items():
        with pytest.raises(UsageError, match=message):
            session.load_states(states)
    with pytest.raises(UsageError, match="need 2 integer ids"):
        session.push([1, 2, 3])
    # states are checked where they enter (load_states); the session's own are never handed out,
    # so writing into the ones a caller reads cannot reach the next step
    good["ssm_state_0"][:] = np.nan
    assert np.isfinite(session.push([1, 2])["scores"][:, 1:]).all()


def test_docs_loop_runs(export_dir: tuple[Path, Mamba4Rec], graphs: dict[str, Graphs]) -> None:
    text = (REPO / "docs" / "streaming.md").read_text()
    block = re.search(r"<!-- streaming-loop -->\n```python\n(.*?)```", text, re.S)
    assert block is not None
    scope: dict[str, Any] = {"DIR": str(export_dir[0])}
    exec(compile(block.group(1), "docs/streaming.md", "exec"), scope)
    ref = graphs["scores"].reference([[3, 17, 9, 5], [42, 8, 11]])
    np.testing.assert_allclose(scope["results"]["scores"], ref["scores"], atol=1e-5, rtol=0)


def test_exclude_history_with_streaming_is_refused(tmp_path: Path) -> None:
    model = tiny_model()
    save_checkpoint(tmp_path / "m.pt", model, model.item_tokens, {"max_seq_len": MAX_SEQ})
    res = CliRunner().invoke(
        main,
        [
            "export",
            "--ckpt",
            str(tmp_path / "m.pt"),
            "--out-dir",
            str(tmp_path / "o"),
            "--streaming",
            "--exclude-history",
        ],
    )
    assert res.exit_code == 2
    assert "--exclude-history cannot be combined with --streaming" in res.output
    assert not (tmp_path / "o" / "manifest.json").exists()


@pytest.mark.parametrize("num_layers", [1, 2])
def test_model_step_equals_forward(num_layers: int) -> None:
    """The PyTorch streaming math alone (no ONNX): encode_with_states + step == forward."""
    model = tiny_model(num_layers)
    torch.manual_seed(1)
    seq = torch.randint(1, N_ITEMS, (4, 30))
    lens = torch.tensor([30, 1, 7, 16])
    with torch.no_grad():
        user, convs, ssms = model.encode_with_states(seq, lens)
        torch.testing.assert_close(user, model(seq, lens), atol=1e-6, rtol=0)
        ext = torch.cat([seq, torch.zeros(4, 5, dtype=torch.long)], 1)
        cur = lens.clone()
        for _ in range(5):
            ids = torch.randint(1, N_ITEMS, (4,))
            ext[torch.arange(4), cur] = ids
            cur = cur + 1
            user, convs, ssms = model.step(ids, convs, ssms)
            torch.testing.assert_close(user, model(ext, cur), atol=1e-5, rtol=0)


def test_bench_streaming_command(export_dir: tuple[Path, Mamba4Rec], tmp_path: Path) -> None:
    """`m4r bench --streaming` runs both paths on the same histories and reports them side by side."""
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(
        main,
        [
            "bench",
            "--streaming",
            "--artifact",
            str(export_dir[0]),
            "--batch",
            "1",
            "3",
            "--seq",
            "4",
            "20",
            "--repeats",
            "3",
            "--warmup",
            "1",
            "--json",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    # the header once, before the rows; each row once (issue 22.7: rows came first, then the table again)
    lines = res.output.splitlines()
    heads = [n for n, ln in enumerate(lines) if ln.startswith("| batch | history | re-encode ms | step ms")]
    rows = [n for n, ln in enumerate(lines) if re.match(r"\|\s+\d+ \|", ln)]
    assert len(heads) == 1 and len(rows) == 4 and heads[0] < rows[0], res.output
    report = json.loads(out.read_text())
    assert [(p["batch"], p["history"]) for p in report["points"]] == [(1, 4), (1, 20), (3, 4), (3, 20)]
    for p in report["points"]:
        assert p["runs"] == 3 and p["step"]["p50_ms"] > 0 and p["reencode"]["p50_ms"] > 0
        assert p["speedup"] == pytest.approx(p["reencode"]["p50_ms"] / p["step"]["p50_ms"])


def test_session_start_refuses_none_and_raw_tokens(export_dir: tuple[Path, Mamba4Rec]) -> None:
    """Issue 22.7: start(None) is a clear error (was a bare TypeError); string tokens are refused
    (were read as indices: the token '5' is not item index 5)."""
    session = StreamingSession.from_dir(export_dir[0])
    with pytest.raises(UsageError, match=r"start\(histories\): expected one list of item indices per row"):
        session.start(None)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"row 0 holds '5' \(str\).*encode_histories"):
        session.start([["5", "17"]])  # type: ignore[list-item]
    with pytest.raises(UsageError, match="row 1 holds 2.0"):
        session.start([[1], [2.0]])  # type: ignore[list-item]
    assert session.start(np.array([[1, 2]]))[session.head_names[0]].shape[0] == 1


def test_index_inputs_refuse_raw_tokens() -> None:
    from m4r_export.data import pad_sequences
    from m4r_export.onnx import histories_to_inputs, truncate_inputs

    with pytest.raises(UsageError, match=r"histories: row 0 holds '5'.*encode_histories"):
        pad_sequences([["5", "17"]], 4)
    with pytest.raises(UsageError, match=r"histories: row 0 holds '5'"):
        histories_to_inputs([["5", "17"]], 4)
    with pytest.raises(
        UsageError, match=r"item_seq must hold integer item indices, got <U2.*encode_histories"
    ):
        truncate_inputs([["5", "17"]], [2], 4)  # type: ignore[arg-type]
    seq, lens = pad_sequences([[5, 17], np.array([3])], 4)
    assert seq.tolist() == [[5, 17, 0, 0], [3, 0, 0, 0]] and lens.tolist() == [2, 1]


def test_long_histories_go_through_init_in_bounded_windows(
    export_dir: tuple[Path, Mamba4Rec], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 20 item 4: init never sees more than init_window events of a row, whatever the history's
    length (its memory grows with that width); step folds in the rest, exactly."""
    from m4r_export import streaming

    out_dir, _ = export_dir
    rng = np.random.default_rng(11)
    histories = [rng.integers(1, N_ITEMS, n).tolist() for n in (23, 5, 0, 9)]
    whole = StreamingSession.from_dir(out_dir)  # default window: every row through init at once
    want = whole.start(histories, exclude=[[3], [], [4, 5], []])
    want_states = whole.states

    cfg = whole.manifest["model"]
    per_event = int(cfg["expand"]) * int(cfg["hidden_size"]) * int(cfg["d_state"]) * 4  # closed-form temp
    monkeypatch.setattr(streaming, "INIT_WINDOW_TEMP_BYTES", 4 * per_event, raising=False)  # window: 4
    session = StreamingSession.from_dir(out_dir)
    widths: list[int] = []
    run = session._init.run

    def spy(names: Any, feeds: dict[str, np.ndarray]) -> Any:
        widths.append(feeds["item_seq"].shape[1])
        return run(names, feeds)

    monkeypatch.setattr(session._init, "run", spy)
    got = session.start(histories, exclude=[[3], [], [4, 5], []])
    assert widths and max(widths) <= 4, widths
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0)
    for name, state in session.states.items():
        np.testing.assert_allclose(state, want_states[name], atol=1e-5, rtol=0)


def test_largest_accepted_history_is_enforced(export_dir: tuple[Path, Mamba4Rec]) -> None:
    from m4r_export.streaming import MAX_REQUEST_EVENTS

    session = StreamingSession.from_dir(export_dir[0], max_events=6)
    session.start([[1, 2, 3, 4, 5, 6]])
    with pytest.raises(
        UsageError, match=r"a history has 7 events, above the 6 one call accepts \(max_events\)"
    ):
        session.start([[1], [1, 2, 3, 4, 5, 6, 7]])
    assert StreamingSession.from_dir(export_dir[0]).max_events == MAX_REQUEST_EVENTS
    with pytest.raises(UsageError, match="max_events=0"):
        StreamingSession.from_dir(export_dir[0], max_events=0)
    doc = (REPO / "docs" / "streaming.md").read_text()
    assert f"{MAX_REQUEST_EVENTS:,}" in doc


def test_extend_equals_pushing_one_by_one(export_dir: tuple[Path, Mamba4Rec]) -> None:
    out_dir, _ = export_dir
    a, b = StreamingSession.from_dir(out_dir), StreamingSession.from_dir(out_dir)
    for s in (a, b):
        s.start([[3, 5], [], [7]])
    got = a.extend([[13, 2, 9], [], [5]], exclude=[[1], [], []])
    for ids in ([13, 0, 5], [2, 0, 0], [9, 0, 0]):
        want = b.push(ids, exclude=[[1], [], []])
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, rtol=0)
    for name, state in a.states.items():
        np.testing.assert_allclose(state, b.states[name], atol=1e-6, rtol=0)
    np.testing.assert_allclose(a.extend([[], [], []])["scores"], b.push([0, 0, 0])["scores"], atol=1e-6)
    with pytest.raises(UsageError, match="need 3 lists"):
        a.extend([[1]])


def _plain(session: StreamingSession) -> StreamingSession:
    session._bindable = False  # every step through InferenceSession.run, as before the binding
    return session


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_bound_steps_equal_plain_runs(export_dir: tuple[Path, Mamba4Rec], precision: str) -> None:
    """The prepared binding (two state sets swapping roles, exclude buffers rewritten or rebound when
    their width changes, cached zeros for no exclude) gives exactly what plain runs give."""
    out_dir, _ = export_dir
    bound = StreamingSession.from_dir(out_dir, precision)
    plain = _plain(StreamingSession.from_dir(out_dir, precision))
    excludes = [None, [[4, 9, 2], [], [7]], None, [[5], [6], [8]], [[3], [3], [3]], None, None]
    for s in (bound, plain):
        s.start([[3, 5], [], [7, 1, 2]])
    for t, exclude in enumerate(excludes):
        ids = [1 + (t * 7 + r * 3) % (N_ITEMS - 1) for r in range(3)]
        got, want = bound.push(ids, exclude=exclude), plain.push(ids, exclude=exclude)
        np.testing.assert_array_equal(got["scores"], want["scores"], err_msg=f"push {t}")
    got, want = bound.extend([[4, 4, 4], [], [9]]), plain.extend([[4, 4, 4], [], [9]])
    np.testing.assert_array_equal(got["scores"], want["scores"])
    for name, state in bound.states.items():
        np.testing.assert_array_equal(state, plain.states[name], err_msg=name)
    assert bound._binding is not None and plain._binding is None  # both paths really ran


def test_bound_states_are_not_shared_with_the_caller(
    export_dir: tuple[Path, Mamba4Rec], graphs: dict[str, Graphs]
) -> None:
    out_dir, _ = export_dir
    session = StreamingSession.from_dir(out_dir)
    session.start([[3, 5], [11]])
    session.push([0, 0])  # no event: the states now live in the binding's buffers
    saved = session.states
    kept = {k: v.copy() for k, v in saved.items()}
    for ids in ([2, 2], [4, 4], [6, 6]):  # both state sets written at least once
        session.push(ids)
    for name, value in saved.items():
        np.testing.assert_array_equal(value, kept[name], err_msg=f"{name} changed under the caller")
    session.load_states(saved)
    session.push([7, 8])
    for name, value in saved.items():  # the loaded arrays are read, never written
        np.testing.assert_array_equal(value, kept[name], err_msg=f"{name} written by a step")
    ref = graphs["scores"].reference([[3, 5, 7], [11, 8]])
    np.testing.assert_allclose(session.push([0, 0])["scores"], ref["scores"], atol=1e-5, rtol=0)
    session.start([[1], [2], [3], [4]])  # another batch size: a new binding
    ref = graphs["scores"].reference([[1, 5], [2, 5], [3, 5], [4, 5]])
    np.testing.assert_allclose(session.push([5, 5, 5, 5])["scores"], ref["scores"], atol=1e-5, rtol=0)
