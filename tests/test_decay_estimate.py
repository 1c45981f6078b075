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
        terms = decay.scan_terms(mamba, x)
        A, dt, states, c_last = terms.A, terms.dt, terms.states, terms.c_last
        dropped = decay.dropped_part(terms)
        bound = decay.dropped_bound(terms)
        _, u, _, _, B, _ = mamba._project(x)
    u, B = u.double(), B.double()
    # the most one position adds to any state of its channel (what the bound's recurrence sums)
    assert torch.allclose(terms.drive, dt * u.abs() * B.abs().amax(2)[:, None, :], rtol=1e-12)
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
    # the kernel-computable bound is a bound, everywhere, and not a vacuous one at the end of the row
    assert torch.all(bound >= dropped * (1 - 1e-12))
    ratio = bound[:, :, -1] / dropped[:, :, -1].clamp(min=1e-300)
    assert float(ratio.median()) < 100.0


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
    assert loose["bound"]["window_quantiles"]["max"] >= loose["window_quantiles"]["max"]
    assert 0 < loose["projection_rows"] <= tight["projection_rows"] <= 1.0
    assert 0 < loose["scan_work_sorted"] <= 1.0 and 0 < loose["scan_work_blocks"] <= 1.0
    table = decay.render_decay(result)
    assert "| 0.001 | oracle |" in table and "| 1e-09 | bound |" in table


def test_bound_is_exact_when_every_contribution_adds_up() -> None:
    # one channel, two states decaying alike, positive inputs, B[0] >= B[1], read-out C = (1, 0): every
    # step of the bound is tight, so a bound that drops part of the drive or of a state is caught
    gen = torch.Generator().manual_seed(3)
    L = 12
    A = torch.tensor([[-0.5, -0.5]], dtype=torch.float64)
    dt = 0.1 + torch.rand(1, 1, L, generator=gen, dtype=torch.float64)
    u = torch.rand(1, 1, L, generator=gen, dtype=torch.float64)
    b0 = 0.5 + torch.rand(1, L, generator=gen, dtype=torch.float64)
    B = torch.stack([b0, 0.3 * b0], 2)  # (1, L, 2)
    h = torch.zeros(1, 1, 2, dtype=torch.float64)
    states = []
    for t in range(L):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[:, :, None] * B[:, t, None, :]
        states.append(h)
    terms = decay.ScanTerms(
        A,
        dt,
        torch.stack(states, 2),
        torch.tensor([[1.0, 0.0]], dtype=torch.float64),
        dt * u * b0[:, None, :],
    )
    assert torch.allclose(decay.dropped_bound(terms), decay.dropped_part(terms), rtol=1e-12, atol=0)
