"""TRL's fused log-prob function on CPU: routed to plain PyTorch whether or not Triton is installed."""

from __future__ import annotations

import pytest
import torch


def test_cpu_tensors_never_reach_triton_and_get_exact_log_probs(monkeypatch):
    import trl.trainer.utils as trl_utils

    from sdgrpo import compat

    class TritonOnGpuMachine:  # what a GPU machine's TRL holds; its kernel cannot run on CPU tensors
        @staticmethod
        def apply(*args, **kwargs):
            raise RuntimeError("0 active drivers ([]). There should only be one.")

    monkeypatch.setattr(compat._DeviceDispatch, "triton", compat._DeviceDispatch.triton)  # restored afterwards
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", TritonOnGpuMachine)
    assert compat.ensure_trl_runs_without_triton() and not compat.ensure_trl_runs_without_triton()
    assert compat._DeviceDispatch.triton is TritonOnGpuMachine
    torch.manual_seed(0)
    hidden, weight, targets = torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,))
    logps, entropy, *_ = trl_utils._ChunkedLogProbFunction.apply(hidden, weight, None, targets, 0.7, 4096)
    logits = (hidden @ weight.t()) / 0.7
    want = torch.log_softmax(logits.double(), -1)
    torch.testing.assert_close(logps.double(), want[torch.arange(5), targets], atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), -(want.exp() * want).sum(-1), atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_cuda_tensors_go_to_triton_where_it_exists():
    import trl.trainer.utils as trl_utils

    from sdgrpo import compat

    compat.ensure_trl_runs_without_triton()
    if compat._DeviceDispatch.triton is None:
        pytest.skip("TRL's Triton kernel is not importable here")
    seen = []
    real = compat._DeviceDispatch.triton

    class Spy:
        @staticmethod
        def apply(*args, **kwargs):
            seen.append(args[0].device.type)
            return real.apply(*args, **kwargs)

    compat._DeviceDispatch.triton = Spy
    try:
        hidden, weight = torch.randn(4, 16, device="cuda"), torch.randn(32, 16, device="cuda")
        trl_utils._ChunkedLogProbFunction.apply(hidden, weight, None, torch.zeros(4, dtype=torch.long, device="cuda"),
                                                1.0, 4096)
    finally:
        compat._DeviceDispatch.triton = real
    assert seen == ["cuda"]
