"""engine/int4_pack.py: the refresh's Triton kernel, run on CPU by Triton's interpreter (``TRITON_INTERPRET=1``),
against the torch quantiser and packer it replaces on CUDA (the GPU test runs it compiled)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def int4_pack():
    """The module, its kernels interpreted on CPU (conftest sets TRITON_INTERPRET there before triton is imported)."""
    import os

    if torch.cuda.is_available():
        pytest.skip("on a GPU the kernel runs compiled: tests/gpu/test_gpu.py checks it there")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py sets it)")
    from sdgrpo.engine import int4_pack

    return int4_pack


def weights(rows: int, k: int, group: int) -> torch.Tensor:
    torch.manual_seed(rows + k)
    w = torch.randn(rows, k) * torch.logspace(-3, 1, k)
    w[3, :group] = 0.25  # a constant group: the scale clamped to 1e-6, every value on the low end
    w[7, group:2 * group] = torch.arange(group) % 16 / 15.0  # values on the levels
    w[8, :group] = 0.0
    w[8, :16] = torch.arange(16) * 2.0 ** -7 + 2.0 ** -8  # scale 2^-7 exactly (w[8, 15] is its top): ties at .5
    w[8, 15] = 15 * 2.0 ** -7
    w[9] = -w[9] * 1e4
    return w


@pytest.mark.parametrize("rows, k, group, first", [(40, 256, 64, 0), (77, 512, 128, 9), (32, 96, 32, 5)])
def test_the_kernel_writes_the_torch_quantisers_words_scales_and_lows_to_the_bit(int4_pack, rows, k, group, first):
    """Rows not a multiple of the kernel's block, written at a column offset into wider tensors: the columns written
    hold quantise_affine then pack_gemlite's words (transposed), scales and lows to the bit, ties at exactly half a
    step rounded to even; the columns around them keep what they held, and the weight is not changed."""
    from sdgrpo.engine import pack_gemlite, quantise_affine

    w = weights(rows, k, group)
    q, scale, low = quantise_affine(w, group)
    assert int(q[8, 2]) == 2 and int(q[8, 3]) == 4  # the ties really are ties: 2.5 -> 2, 3.5 -> 4
    n = first + rows + 7
    words = torch.full((k // 8, n), -7, dtype=torch.int32)
    meta = torch.full((2, k // group + 3, n), -3.0, dtype=torch.bfloat16)  # padded rows, as GemliteLinear holds
    scales, lows = meta[0, :k // group], meta[1, :k // group]
    given = w.clone()
    int4_pack.quantise_pack_into(given, words, scales, lows, first, group)
    cols = slice(first, first + rows)
    assert torch.equal(given, w)
    assert torch.equal(words[:, cols], pack_gemlite(q))
    assert torch.equal(scales[:, cols], scale.t()) and torch.equal(lows[:, cols], low.t())
    outside = torch.ones(n, dtype=torch.bool)
    outside[cols] = False
    assert bool((words[:, outside] == -7).all()) and bool((meta[:, :, outside] == -3).all())
    assert bool((meta[:, k // group:] == -3).all())


def test_a_bf16_weight_gives_what_its_float32_values_give(int4_pack):
    from sdgrpo.engine import pack_gemlite, quantise_affine

    w = weights(40, 256, 64).to(torch.bfloat16)
    q, scale, low = quantise_affine(w.float(), 64)
    words = torch.zeros(32, 40, dtype=torch.int32)
    scales, lows = torch.zeros(4, 40, dtype=torch.bfloat16), torch.zeros(4, 40, dtype=torch.bfloat16)
    int4_pack.quantise_pack_into(w, words, scales, lows, 0, 64)
    assert torch.equal(words, pack_gemlite(q)) and torch.equal(scales, scale.t()) and torch.equal(lows, low.t())


# NaN as Python writes it (0x7FC00000), CUDA's canonical NaN (0x7FFFFFFF: the bf16 rounding's carry ran into the
# sign bit and wrote -0.0 on an H100, 2026-12-07) and negative NaNs
@pytest.mark.parametrize("nan_bits", [0x7FC00000, 0x7FFFFFFF, -1, -0x400000])
def test_a_group_holding_nan_gets_nan_scales_as_the_torch_quantiser_gives(int4_pack, nan_bits):
    """A diverged weight is not hidden: torch's aminmax propagates NaN into the group's scale and low, and so does
    the kernel (Triton's own min / max drop it), whatever the NaN's bits; the other groups are unchanged."""
    from sdgrpo.engine import pack_gemlite, quantise_affine

    w = weights(40, 256, 64)
    w[5, 70] = torch.tensor([nan_bits], dtype=torch.int32).view(torch.float32)[0]
    assert bool(w[5, 70].isnan())
    _, scale, low = quantise_affine(w, 64)
    assert bool(scale[5, 1].isnan()) and bool(low[5, 1].isnan())
    words = torch.zeros(32, 40, dtype=torch.int32)
    scales, lows = torch.zeros(4, 40, dtype=torch.bfloat16), torch.zeros(4, 40, dtype=torch.bfloat16)
    int4_pack.quantise_pack_into(w, words, scales, lows, 0, 64)
    assert bool(scales[1, 5].isnan()) and bool(lows[1, 5].isnan())
    same = ~scale.t().isnan()
    assert same.sum() == 40 * 4 - 1 and torch.equal(scales[same], scale.t()[same]) and torch.equal(lows[same],
                                                                                                  low.t()[same])
    clean = w.clone()
    clean[5] = 0.0
    assert torch.equal(words[:, :5], pack_gemlite(quantise_affine(clean, 64)[0])[:, :5])


def test_shapes_that_do_not_fit_are_refused_before_the_kernel_runs(int4_pack):
    words = torch.zeros(32, 40, dtype=torch.int32)
    meta = torch.zeros(4, 40, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="does not fit"):
        int4_pack.quantise_pack_into(torch.zeros(8, 256), words, meta, meta, 36, 64)  # past the last column
    with pytest.raises(ValueError, match="does not fit"):
        int4_pack.quantise_pack_into(torch.zeros(8, 128), words, meta, meta, 0, 64)  # another width
    with pytest.raises(ValueError, match="power of two"):
        int4_pack.quantise_pack_into(torch.zeros(8, 240), torch.zeros(30, 40, dtype=torch.int32), meta, meta, 0, 48)
    with pytest.raises(ValueError, match="bf16"):
        int4_pack.quantise_pack_into(torch.zeros(8, 256), words, meta.float(), meta, 0, 64)
    with pytest.raises(ValueError, match="contiguous"):
        int4_pack.quantise_pack_into(torch.zeros(8, 256), words, torch.zeros(40, 4, dtype=torch.bfloat16).t(), meta,
                                     0, 64)
