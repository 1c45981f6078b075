"""The oracle truncation estimate (m4r_export/bench/decay.py, benchmarks/decay_window.py): the dropped part
it computes is what a scan started later really loses, and the work shares count blocks as stated."""

from __future__ import annotations

import torch

from m4r_export.bench import decay
from m4r_export.model.mamba4rec import Mamba4Rec


def _model(layers: int) -> Mamba4Rec:
    torch.manual_seed(0)
    model = Mamba4Rec(n_items=30, hidden_size=16, num_layers=layers, d_state=4, d_conv=4, expand=2).eval()
    with torch.no_grad():  # larger dt than the init's 0.001-0.1, so that the history fades within the row
        model.mamba_layers[-1].mamba.dt_proj.bias.fill_(0.5)
    return model


def test_dropped_part_is_what_a_scan_started_later_loses() -> None:
    model = _model(1)
    seq = torch.randint(1, 30, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = decay.last_layer_inputs(model, seq)
        mamba = model.mamba_layers[-1].mamba
        A, dt, states, c_last = decay.scan_terms(mamba, x)
        dropped = decay.dropped_part(A, dt, states, c_last)
        _, u, _, _, B, _ = mamba._project(x)
    u, B = u.double(), B.double()
    L = seq.shape[1]
    for row, t0 in ((0, 1), (1, 5), (0, 17), (1, L - 1)):
        h = torch.zeros_like(states[row, :, 0])
        for t in range(t0, L):  # the scan from t0, zero state before it
            h = (
                torch.exp(dt[row, :, t, None] * A) * h
                + (dt[row, :, t] * u[row, :, t])[:, None] * B[row, t][None]
            )
        lost = ((states[row, :, L - 1] - h) * c_last[row][None]).sum(-1).abs()
        assert torch.allclose(dropped[row, :, t0], lost, rtol=1e-9, atol=1e-15), (row, t0)
    assert torch.all(dropped[:, :, 0] == 0)


def test_windows_take_the_shortest_safe_start() -> None:
    dropped = torch.tensor([[[0.0, 1e-3, 1e-8, 1e-6, 1e-10]]])  # one row, one channel, L = 5
    assert decay.windows(dropped, 1e-7).tolist() == [[1]]  # t0 = 4 is within tol
    assert decay.windows(dropped, 1e-11).tolist() == [[5]]  # only t0 = 0
    assert decay.windows(dropped, 1e-5).tolist() == [[1]]
    assert decay.windows(dropped[..., :4], 1e-7).tolist() == [[2]]  # t0 = 2 (1e-8); t0 = 3 (1e-6) is not


def test_work_shares_count_lane_blocks_in_stored_and_sorted_order() -> None:
    win = torch.tensor([[10, 1, 10, 1]])
    shares = decay.work_shares(win, torch.tensor([1, 3, 0, 2]), seq=10, lanes=2)
    assert shares["projection_rows"] == 1.0
    assert shares["scan_work_blocks"] == 1.0  # blocks (10, 1) and (10, 1)
    assert shares["scan_work_sorted"] == 0.55  # blocks (1, 1) and (10, 10): (1 + 10) / 20


def test_estimate_runs_on_a_two_layer_model() -> None:
    result = decay.run_decay_estimate(_model(2), seq=20, rows=2, tols=(1e-3, 1e-9))
    assert result["layers"] == 2 and [r["tol"] for r in result["results"]] == [1e-3, 1e-9]
    loose, tight = result["results"]
    assert 0 < loose["projection_rows"] <= tight["projection_rows"] <= 1.0
    assert 0 < loose["scan_work_sorted"] <= 1.0 and 0 < loose["scan_work_blocks"] <= 1.0
    assert "| 0.001 |" in decay.render_decay(result)
