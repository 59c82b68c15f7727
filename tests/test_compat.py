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


def full_fused_head(hidden, weight, bias, targets, temperature, softcap=None, scale=1.0):
    """TRL's fused-head outputs from the whole [N, V] logits at once (what sdgrpo's CPU version computed before it
    went chunk by chunk): the independent computation the chunked one is checked against."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits.float() * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return (logp.gather(-1, targets[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1),
            torch.logsumexp(2 * logp, dim=-1), logits.mean(-1), (logits.argmax(-1) == targets).float())


@pytest.mark.parametrize("temperature,softcap,scale,chunk", [(1.0, None, 1.0, 256), (0.7, None, 1.0, 7),
                                                             (1.3, 2.0, 0.5, 16)])
def test_plain_fused_head_values_and_gradients_equal_the_whole_logits(monkeypatch, temperature, softcap, scale,
                                                                        chunk):
    """The CPU fused head, in chunks of ``chunk`` tokens (several per call, the last one short), gives TRL's five
    outputs and the gradients of hidden states, head weight and bias that the whole-logits computation gives."""
    from sdgrpo import chunked, compat

    monkeypatch.setattr(chunked, "CHUNK_TOKENS", chunk)
    torch.manual_seed(0)
    n, h, v = 300, 16, 50
    leaves = [torch.randn(n, h, requires_grad=True), torch.randn(v, h, requires_grad=True),
              torch.randn(v, requires_grad=True)]
    targets = torch.randint(0, v, (n,))
    w_logp, w_ent = torch.randn(n), torch.randn(n)
    results = []
    for fused in (True, False):
        params = [x.detach().clone().requires_grad_() for x in leaves]
        if fused:
            out = compat._plain_chunked_logprob(*params, targets, temperature, 4096, softcap, scale,
                                                ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
        else:
            out = full_fused_head(*params, targets, temperature, softcap, scale)
        ((out[0] * w_logp).sum() + (out[1] * w_ent).sum()).backward()
        results.append(([o.detach() for o in out], [p.grad for p in params]))
    (got, got_grads), (want, want_grads) = results
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_plain_fused_head_never_holds_more_than_a_chunk_of_logits(monkeypatch):
    """Forward and backward of a call 100 tokens long make no tensor of more than 16 tokens x vocabulary (the
    chunk) with the vocabulary as last dimension; the whole-logits computation makes 100 x V."""
    from conftest import LargestLogits
    from sdgrpo import chunked, compat

    monkeypatch.setattr(chunked, "CHUNK_TOKENS", 16)
    torch.manual_seed(0)
    n, h, v = 100, 8, 50
    hidden, weight = torch.randn(n, h, requires_grad=True), torch.randn(v, h, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    with LargestLogits(v) as chunked_run:
        logps, entropy, *_ = compat._plain_chunked_logprob(hidden, weight, None, targets, 0.9, 4096)
        (logps.sum() + entropy.sum()).backward()
    assert 0 < chunked_run.largest <= 16 * v, chunked_run.shape
    with LargestLogits(v) as whole:
        logps, entropy, *_ = full_fused_head(hidden, weight, None, targets, 0.9)
        (logps.sum() + entropy.sum()).backward()
    assert whole.largest == n * v


def test_plain_fused_head_keeps_an_empty_call_connected():
    """No labelled token at all (an all-masked micro-batch): empty outputs whose backward still runs."""
    from sdgrpo import compat

    hidden, weight = torch.randn(0, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    logps, entropy, *_ = compat._plain_chunked_logprob(hidden, weight, None, torch.zeros(0, dtype=torch.long), 1.0,
                                                       4096)
    assert logps.shape == entropy.shape == (0,)
    (logps.sum() + entropy.sum()).backward()
    assert weight.grad is not None and not weight.grad.any()
