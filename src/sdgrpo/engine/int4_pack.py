"""One Triton kernel for a refresh of the int4 copies: a float weight's rows quantised (:func:`int4.quantise_affine`:
asymmetric round-to-nearest 4-bit groups, scale and low rounded to bf16 first) and packed (:func:`int4.pack_gemlite`:
int32 words [K / 8, N], scales and lows [K / group, N]) straight into a :class:`int4.GemliteLinear`'s tensors, in one
read of the weight.

The torch version (``quantise_affine_words_``, then transposed copies into the module) makes about eight passes
over a float32 chunk; the refresh of the 7B shape's copies spent most of its 0.26 s there (aminmax, sub, div,
round, clamp, the uint8 cast and the transposes: one H100, 2026-12-07, profile_decode_qwen2.5-7b_h100_2026-12-07.txt).
The kernel gives the same words, scales and lows to the bit: the same float32 arithmetic in the same order (the
scale multiplied by float32(1 / 15), ``int4.AFFINE_STEP``; q's division rounded to nearest, as torch's is), bf16
rounded to nearest even by hand and q rounded half to even, as ``torch.round`` does, both written out so that Triton's
interpreter (``TRITON_INTERPRET=1``, the CPU test) computes them as the GPU does. A first version divided the scale by
15: bit for bit torch's CPU path, not its CUDA one (the GPU test found words that differed; one H100, 2026-12-07).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .int4 import AFFINE_STEP

BLOCK_ROWS = 32  # rows a program: a word of 32 neighbouring rows is one 128-byte store


@triton.jit
def _bf16_nearest_even(x):
    """float32 ``x`` rounded to the nearest bf16 (ties to even), still as float32: by hand, as the interpreter's
    conversion truncates. NaN stays NaN: the carry of CUDA's canonical NaN (0x7FFFFFFF) runs into the sign bit."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16  # uint32: logical shifts
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def _min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)  # NaN in, NaN out, as torch.aminmax


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _quantise_pack(w_ptr, words_ptr, scales_ptr, lows_ptr, rows, stride_w, n, first,
                   GROUP: tl.constexpr, BLOCK: tl.constexpr, STEP: tl.constexpr):
    row = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    group = tl.program_id(1)
    word = tl.arange(0, GROUP // 8)
    nibble = tl.arange(0, 8)
    inside = row < rows
    column = group * GROUP + word[:, None] * 8 + nibble[None, :]
    w = tl.load(w_ptr + row[:, None, None] * stride_w + column[None, :, :], mask=inside[:, None, None],
                other=0.0).to(tl.float32)
    # tl.min / tl.max drop NaN (maxnum); a diverged weight must give NaN scales as the torch path's do, not hide
    lo = tl.reduce(tl.reduce(w, 2, _min_nan), 1, _min_nan)
    hi = tl.reduce(tl.reduce(w, 2, _max_nan), 1, _max_nan)
    scale = _bf16_nearest_even(_max_nan(hi - lo, 1e-6) * STEP)  # STEP: int4.AFFINE_STEP, a float32 constant
    low = _bf16_nearest_even(lo)
    x = tl.math.div_rn(w - low[:, None, None], scale[:, None, None])
    x = tl.minimum(tl.maximum(x, 0.0), 15.0)  # before rounding: the same q as torch's round, then clamp
    whole = tl.floor(x)
    q = whole.to(tl.int32)
    rest = x - whole
    q += ((rest > 0.5) | ((rest == 0.5) & ((q & 1) == 1))).to(tl.int32)  # half to even
    # eight nibbles a word, value j in bits 4j: disjoint bits, so their sum is their or
    words = tl.sum(q.to(tl.uint32) << (nibble * 4).to(tl.uint32)[None, None, :], axis=2)
    out = first + row
    word_row = group * (GROUP // 8) + word
    tl.store(words_ptr + word_row[None, :] * n + out[:, None], words.to(tl.int32, bitcast=True),
             mask=inside[:, None])
    tl.store(scales_ptr + group * n + out, scale.to(tl.bfloat16), mask=inside)
    tl.store(lows_ptr + group * n + out, low.to(tl.bfloat16), mask=inside)


def quantise_pack_into(weight: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor,
                       first: int, group: int) -> None:
    """``weight`` (float, [R, K], not changed) quantised into columns ``first:first + R`` of ``words`` (int32
    [K / 8, N]), ``scales`` and ``lows`` (bf16 [K / group, N], rows of N contiguous)."""
    rows, k = weight.shape
    n = words.size(1)
    if (group < 8 or group & (group - 1) or k % group or words.shape != (k // 8, n) or first + rows > n
            or words.dtype != torch.int32):
        raise ValueError(f"a [{rows}, {k}] weight at column {first} does not fit int32 words {tuple(words.shape)} "
                         f"in groups of {group} (a power of two, at least 8)")
    for t in (scales, lows):
        if t.dtype != torch.bfloat16 or t.size(0) < k // group or t.size(1) != n:
            raise ValueError(f"scales and lows must be bf16 [{k // group}, {n}], not {t.dtype} {tuple(t.shape)}")
    for t in (words, scales, lows):
        if t.stride() != (n, 1) or t.device != weight.device:
            raise ValueError(f"quantise_pack_into writes rows of {n} contiguous values on {weight.device}, not "
                             f"strides {t.stride()} on {t.device}")
    weight = weight.contiguous()
    grid = (triton.cdiv(rows, BLOCK_ROWS), k // group)
    with torch.cuda.device(weight.device) if weight.is_cuda else contextlib.nullcontext():  # Triton's current device
        _quantise_pack[grid](weight, words, scales, lows, rows, weight.stride(0), n, first, GROUP=group,
                             BLOCK=BLOCK_ROWS, STEP=AFFINE_STEP)
