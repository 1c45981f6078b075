"""The GPU self-check's harness, exercised on CPU (the C++ CPU reference stands in for the kernels)."""

from __future__ import annotations

import shutil

import pytest
import torch

from m4r_export.trt import selftest


def test_traffic_model_counts_each_tensor_once() -> None:
    case = selftest.Case(2, 4, 10, 3, torch.float16, "all")
    # u, delta, z, y: 2*4*10 each; B, C: 2*3*10 each; fp16 -> 2 bytes; A, D, delta_bias fp32
    assert case.bytes_moved() == (4 * 80 + 2 * 60) * 2 + 4 * (3 + 2) * 4
    last = selftest.Case(2, 4, 10, 3, torch.float32, "last")
    assert last.bytes_moved() < selftest.Case(2, 4, 10, 3, torch.float32, "all").bytes_moved()


def test_inputs_cover_clamped_lengths() -> None:
    t, lengths = selftest.make_inputs(selftest.Case(6, 4, 7, 3, torch.bfloat16, "last"), torch.device("cpu"))
    assert lengths.tolist() == [10, 0, 3, 10, 0, 6]
    assert t["u"].dtype == torch.bfloat16 and t["A"].dtype == torch.float32 and bool((t["A"] < 0).all())


def test_rel_err_treats_nan_as_failure() -> None:
    assert selftest.rel_err(torch.tensor([float("nan")]), torch.tensor([1.0])) == float("inf")


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_cpu_dry_run_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert selftest.main(["--cpu-dry-run", "--no-speed"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.count("ok  ") == 4 and "vs torch ref" in out


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_cpu_dry_run_fails_when_the_cpu_reference_is_wrong(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The dry run compares the CPU reference with the PyTorch reference, not with itself."""
    real = selftest.load_cpu_scan

    def off_by_a_little(path: object) -> selftest.ScanFn:
        fn = real(path)  # type: ignore[arg-type]
        return lambda t, lengths, mode: fn(t, lengths, mode) * 1.01

    monkeypatch.setattr(selftest, "load_cpu_scan", off_by_a_little)
    assert selftest.main(["--cpu-dry-run", "--no-speed"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_expf_bound_grows_with_length_and_decay() -> None:
    t, _ = selftest.make_inputs(selftest.Case(2, 4, 10, 3, torch.float32, "all"), torch.device("cpu"))
    one = selftest.expf_error_bound(t, 1)
    assert one >= 2 * 2.0**-24 and selftest.expf_error_bound(t, 1000) == pytest.approx(1000 * one)
    t["A"] = t["A"] * 100  # |dt*A| 100x larger: more ulp per step
    assert selftest.expf_error_bound(t, 1) > 10 * one
