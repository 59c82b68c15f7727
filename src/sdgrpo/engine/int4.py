"""The 4-bit weight-only matmuls that int4 generation copies are read by, their layouts, and the choice of kernel.

- **tinygemm** (:class:`Int4Linear`): PyTorch's own int4 weight-only matmul, private ATen ops (pinned in
  tests/test_private_api.py), groups of 128, 64 or 32.
- **gemlite** (:class:`GemliteLinear`): gemlite's Triton A16W4 kernels on hqq's affine layout, groups of 64, its
  scales zero-padded past the end where its split-K kernels read (:data:`GEMLITE_SPLIT_K_MAX`); off CUDA its
  reference matmul.
- :func:`choose_int4_kernel`: the kernel asked for where it can run (one line, :class:`UserError`, where gemlite
  cannot); auto is gemlite on the architectures of :data:`GEMLITE_AUTO` (an H100's sm 9.0), else tinygemm.
  :data:`INT4_FIRST`: the kernels for which a quantised base gets int4 copies before 16-bit ones.

Their tensors keep their addresses when refreshed (``load`` rows, then ``pack``): a captured CUDA graph reads them.
What fills them is quantised.py's.
"""

from __future__ import annotations

import torch

# The layout and kernels are PyTorch's own weight-only int4 matmul (tinygemm, the kernel torchao's int4 weight-only
# "tinygemm" layout runs on CUDA; a CPU kernel of the same contract): ``aten._convert_weight_to_int4pack`` (CUDA:
# two 4-bit values per byte in; CPU: ``..._for_cpu``, int32 values in) and ``aten._weight_int4pack_mm`` (CPU:
# ``..._for_cpu``) with bf16 activations and per-group (scale, zero) pairs, zero in the float domain:
# ``w = (q - 8) * scale + zero``. Private ATen ops, pinned in tests/test_private_api.py.
INT4_GROUPS = (128, 64, 32)


def int4_layout(out_features: int, in_features: int) -> tuple[int, int] | None:
    """(group size, inner k tiles) for a weight of this shape in the int4 kernels, or None where it has none (the CPU
    kernel packs rows by 16, the CUDA one by 8)."""
    if out_features % 16:
        return None
    group = next((g for g in INT4_GROUPS if in_features % g == 0), None)
    tiles = next((t for t in (8, 4, 2) if in_features % (t * 16) == 0), None)
    return None if group is None or tiles is None else (group, tiles)


def quantise_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest 4-bit quantisation of a [N, K] weight in groups of ``group`` along K, as torchao
    makes tinygemm's (``_get_qparams_tinygemm``: scale = (max - min) / 15 and zero = min + 8 * scale, both rounded
    to bf16 first): (values in 0..15 as int32 [N, K], bf16 scales and zeros [K / group, N, 2])."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group, group)
    low, high = w.amin(-1), w.amax(-1)
    scale = ((high - low).clamp(min=1e-6) / 15).to(torch.bfloat16)
    zero = (low + scale.float() * 8).to(torch.bfloat16)
    low = zero.float() - 8 * scale.float()
    q = ((w - low[..., None]) / scale.float()[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    return q, torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()


def pack_int4(q: torch.Tensor, tiles: int) -> torch.Tensor:
    """``q`` (values 0..15, [N, K]) in the int4 kernel's layout for q's device."""
    if q.device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), tiles)
    q = q.to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), tiles)


class Int4Linear(torch.nn.Module):
    """``y = x @ W^T + b`` with W held as 4-bit groups (:func:`quantise_int4`) and read by the int4 kernel; the input is
    taken to bf16 (the kernel's one activation dtype) and the output back to the input's dtype. Its tensors keep their
    addresses when refreshed (:meth:`load`): a captured CUDA graph reads them."""

    def __init__(self, out_features: int, in_features: int, group: int, tiles: int, device, bias: bool):
        super().__init__()
        self.out_features, self.in_features, self.group, self.tiles = out_features, in_features, group, tiles
        empty = pack_int4(torch.zeros(out_features, in_features, dtype=torch.int32, device=device), tiles)
        self.packed = torch.nn.Parameter(empty, requires_grad=False)
        self.scales_zeros = torch.nn.Parameter(torch.empty(0, dtype=torch.bfloat16, device=device),
                                               requires_grad=False)
        self.reacquire(device)
        self.bias = (torch.nn.Parameter(torch.zeros(out_features, dtype=torch.bfloat16, device=device),
                                        requires_grad=False) if bias else None)

    @staticmethod
    def nbytes(out_features: int, in_features: int, group: int) -> int:
        return out_features * in_features // 2 + (in_features // group) * out_features * 4 + out_features * 2

    packs_rows = False  # the kernel's layout does not keep rows apart: pack once every row is loaded

    def release(self) -> None:
        """Free the copy's weights (a generation's copies between calls, ``Quantised.hold`` false); :meth:`reacquire`
        (scales) and :meth:`pack` (the packed weight, in the kernel's shape) allocate them again."""
        self.packed.data = self.packed.data.new_empty(0)
        self.scales_zeros.data = self.scales_zeros.data.new_empty(0)

    def reacquire(self, device) -> None:
        """The scales and zeros allocated (zeros) where they are not: at construction, and after :meth:`release`."""
        if self.scales_zeros.numel() == 0:
            self.scales_zeros.data = torch.zeros(self.in_features // self.group, self.out_features, 2,
                                                 dtype=torch.bfloat16, device=device)

    @torch.no_grad()
    def load(self, values: torch.Tensor, start: int, weight: torch.Tensor, owned: bool = False) -> None:
        """Rows ``start:start + len(weight)`` of a float weight quantised: their values into ``values`` (uint8
        [N, K], packed by :meth:`pack` once every row is in; the kernel's layout does not keep rows apart), their
        scales and zeros into the copy. ``owned`` is :class:`GemliteLinear`'s (here the weight is only read)."""
        q, scales_zeros = quantise_int4(weight, self.group)
        values[start:start + weight.size(0)] = q
        self.scales_zeros[:, start:start + weight.size(0)] = scales_zeros

    @torch.no_grad()
    def pack(self, values: torch.Tensor) -> None:
        if self.packed.numel() == 0:  # released after the last call
            self.packed.data = pack_int4(values, self.tiles)
        else:
            self.packed.copy_(pack_int4(values, self.tiles))

    def forward(self, x):
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        mm = (torch.ops.aten._weight_int4pack_mm_for_cpu if flat.device.type == "cpu"
              else torch.ops.aten._weight_int4pack_mm)
        out = mm(flat, self.packed, self.group, self.scales_zeros)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


# --- the same copies read by gemlite's Triton kernels ----------------------------------------------------------------
# gemlite (mobiusml/gemlite, pure Triton; what torchao and SGLang use for 4-bit weight-only matmuls) reads hqq's
# affine layout, ``w = q * scale + zero`` per group of ``group`` input columns (its ``W_group_mode`` 4, "fma"), with
# q packed eight to an int32 along K and the whole thing transposed ([K / 8, N]; scales and zeros [K / group, N]).
# Groups of 64 line the copy's groups up with bitsandbytes' NF4 blocks (64 weights a block), so a group of the copy
# re-quantises exactly one block of the base.
GEMLITE_GROUP = 64
# How far past the last group gemlite 0.6's kernels read the scales and zeros. Its split-K loops (GEMM_SPLITK, the
# GEMV split-K kernels) load one row of scales and zeros per block of BLOCK_SIZE_K (at most the group) input columns
# with no mask, for every one of cdiv(K, BLOCK_SIZE_K x SPLIT_K) x SPLIT_K blocks; so where K is not a multiple of
# BLOCK_SIZE_K x SPLIT_K (896, the Qwen2.5-0.5B width, against 512) they read rows past K / group. The activations
# there are masked to 0, but 0 x NaN is NaN: whatever lies past the end poisoned every column (the 0.5B shape decoded
# to NaN log-probs on an H100, 2026-12-07). Its configs go up to SPLIT_K 16 with BLOCK_SIZE_K at most the group, so
# the rows are held to a multiple of 16 groups, plus one row for the unmasked read past N in the last row, all zeros
# (a finite 0 x 0 + 0). tests/gpu/test_gpu.py fills that padding with NaN to show it is read.
GEMLITE_SPLIT_K_MAX = 16


# Rows above which GemliteLinear multiplies in slices of this many rows, the last zero-padded (0: never). gemlite
# autotunes its kernels once per bucket of rows (M_CLOSEST: powers of two and points between, up to 4,096), so a
# prefill (batch x prompt length rows, which vary per batch) meets new buckets, and pays for their autotuning, in
# later steps. On one H100 (2026-12-07, 7B shape, 24 GiB cap, benchmarks/results/bench_step_qwen2.5-7b_h100_
# 2026-12-07_slice.json) the 3rd and 4th steps' prefills took 1.5 and 1.7 s (4 autotuning runs, 1.6 s, and 4
# compilations of gemm_INT_kernel) against 0.08 s, steps 5.65 and 5.84 s against 4.17; in slices of 1,024 every
# prefill took 0.08-0.14 s and the steps 4.14-4.25 s (median 4.19).
GEMLITE_PREFILL_SLICE = 1024


def gemlite_meta_rows(in_features: int, group: int) -> int:
    """Rows of scales (and of zeros) a :class:`GemliteLinear` holds: K / group used, the rest zeros that gemlite's
    split-K kernels read past the end (:data:`GEMLITE_SPLIT_K_MAX`)."""
    reach = GEMLITE_SPLIT_K_MAX * group
    return -(-in_features // reach) * reach // group + 1


def gemlite_layout(out_features: int, in_features: int) -> int | None:
    """The group size for a weight of this shape in gemlite's A16W4 kernels (input width a multiple of 32 and of
    the group), or None where it has none."""
    if in_features % 32 or out_features % 16:
        return None
    return next((g for g in (GEMLITE_GROUP, 32) if in_features % g == 0), None)


# The affine scale is (high - low) times float32(1 / 15), not divided by 15: torch's CUDA division by a Python number
# multiplies by its reciprocal (ATen's div_true_kernel_cuda), its CPU division divides, and the two differ in the last
# bit about half the time. Multiplying gives the same scales on CPU, on CUDA and in int4_pack's kernel.
AFFINE_STEP = 1 / 15


def quantise_affine(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest 4-bit quantisation of a [N, K] weight in groups of ``group`` along K, in the form
    ``w = q * scale + low``: (q in 0..15 as uint8 [N, K], bf16 scales and lows [N, K / group]). The scale and low
    are rounded to bf16 first and q is chosen against the rounded pair, as the kernel will read them."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group, group)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo).clamp(min=1e-6) * AFFINE_STEP).to(torch.bfloat16)
    low = lo.to(torch.bfloat16)
    q = ((w - low.float()[..., None]) / scale.float()[..., None]).round().clamp(0, 15).to(torch.uint8)
    return q.reshape(n, k), scale, low


def quantise_affine_words_(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantise_affine` then :func:`pack_gemlite` (without its transpose) in a few passes over a float32 [N, K]
    ``weight`` that the caller gives up: it is overwritten (the quantisation's arithmetic runs in place, the same
    operations in the same order, so q is the same to the bit). (int32 words [N, K / 8], bf16 scales and lows
    [N, K / group]). Two values a byte, low nibble first, four bytes a little-endian int32 word: value ``j`` in bits
    ``4 * (j % 8)`` of word ``j // 8``, as gemlite packs. A refresh of the 7B shape's int4 copies took 0.44 s a
    generation through quantise_affine and pack_gemlite (about 180 bytes of temporaries moved per weight), 0.31 s
    through this, 0.10 s through int4_pack's Triton kernel, which replaces it on CUDA (torch.compile's fusion left it
    at 0.30 s and cost 30 s of compilation a machine; one H100, 2026-12-07). Off CUDA, and for the tests, this."""
    n, k = weight.shape
    w = weight.view(n, k // group, group)
    lo, hi = torch.aminmax(w, dim=-1)
    scale = ((hi - lo).clamp(min=1e-6) * AFFINE_STEP).to(torch.bfloat16)
    low = lo.to(torch.bfloat16)
    w.sub_(low.float()[..., None]).div_(scale.float()[..., None]).round_().clamp_(0, 15)
    q = weight.to(torch.uint8)
    return (q[:, 0::2] | q[:, 1::2] << 4).view(torch.int32), scale, low


def pack_gemlite(q: torch.Tensor, out: torch.Tensor | None = None, rows: int = 4096) -> torch.Tensor:
    """``q`` (values 0..15, [N, K]) packed as gemlite packs 4-bit weights with 32-bit words
    (``pack_weights_over_cols(..., W_nbits=4, packing_bitwidth=32, transpose=True)``, then made contiguous): column
    ``j`` of a row in bits ``4 * (j % 8)`` of word ``j // 8``; int32 [K / 8, N], into ``out`` where given. ``rows``
    rows at a time, in int32 (the top nibble wraps into the sign bit, as gemlite's words hold it), so a refresh's
    temporaries stay near ``rows x K x 4`` bytes: packing the 7B's gate/up stack whole in int64 took 1.1 GiB and ran
    a 12 GiB run out of memory (one H100, 2026-12-07)."""
    n, k = q.shape
    if out is None:
        out = torch.empty(k // 8, n, dtype=torch.int32, device=q.device)
    for first in range(0, n, rows):
        nibbles = q[first:first + rows].reshape(-1, k // 8, 8).to(torch.int32)
        words = nibbles[..., 0].clone()
        for j in range(1, 8):
            words |= nibbles[..., j] << (4 * j)
        out[:, first:first + rows] = words.t()
    return out


def unpack_gemlite(words: torch.Tensor) -> torch.Tensor:
    """:func:`pack_gemlite` undone: int32 [K / 8, N] to uint8 values [N, K]."""
    shifts = torch.arange(0, 32, 4, device=words.device, dtype=torch.int32)
    q = (words.t()[..., None] >> shifts) & 15
    return q.reshape(words.size(1), -1).to(torch.uint8)


def gemlite_available() -> str | None:
    """Why gemlite's kernels cannot run here (None when they can): not installed, not importable, no CUDA GPU, or a
    GPU older than Ampere (its Triton kernels and tuned configurations start at sm 8.0)."""
    import importlib.util

    if importlib.util.find_spec("gemlite") is None:
        return "gemlite is not installed (pip install gemlite)"
    try:  # installed beside a Triton it does not run on (it needs triton >= 3.6), or half installed
        importlib.import_module("gemlite")
    except Exception as err:  # any failure to import means its kernels cannot run here
        return f"gemlite does not import here ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    if not torch.cuda.is_available():
        return "gemlite needs a CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 0):
        return f"gemlite needs an Ampere or newer GPU (this one is sm {major}.{minor})"
    return None


TRITON_PACK = True  # GemliteLinear.load on CUDA through int4_pack's kernel (false: the torch quantiser, to compare)


class GemliteLinear(torch.nn.Module):
    """``y = x @ W^T + b`` with W held as 4-bit affine groups (:func:`quantise_affine`) in gemlite's layout and read
    by gemlite's A16W4 kernel (bf16 activations, its own choice of GEMV / split-K GEMM by rows) on CUDA. On other
    devices the same tensors are dequantised and multiplied by ``F.linear``: the reference the GPU test checks the
    kernel against (gemlite is Triton, CUDA only). Same ``load``/``pack`` calls as :class:`Int4Linear`; its tensors
    keep their addresses when refreshed (a captured CUDA graph reads them)."""

    def __init__(self, out_features: int, in_features: int, group: int, device, bias: bool):
        super().__init__()
        self.out_features, self.in_features, self.group = out_features, in_features, group
        self.W_q = torch.nn.Parameter(torch.empty(0, dtype=torch.int32, device=device), requires_grad=False)
        self.scales = torch.nn.Parameter(torch.empty(0, dtype=torch.bfloat16, device=device), requires_grad=False)
        self.zeros = torch.nn.Parameter(torch.empty(0, dtype=torch.bfloat16, device=device), requires_grad=False)
        self._meta_store: list[torch.Tensor] = []
        self.reacquire(device)
        self.bias = (torch.nn.Parameter(torch.zeros(out_features, dtype=torch.bfloat16, device=device),
                                        requires_grad=False) if bias else None)
        self._meta_args = self._tensor_extra = None
        self.matmul_type = -1  # gemlite's own choice by rows; an index of its GEMLITE_MATMUL_TYPES forces one
        if torch.device(device).type == "cuda":
            self._meta_args, self._tensor_extra = self._gemlite_args(device)

    def _gemlite_args(self, device):
        """gemlite's metadata for this shape (its ``get_meta_args``: W_group_mode 4, 8 values a word, bf16 in and
        out, ...) and its extra tensor argument, from a module of gemlite's own packed once with zeros."""
        import gemlite
        from gemlite import DType, GemLiteLinear

        # split-K partial sums added into an fp32 output (converted to bf16 once), not bf16 atomics, which gemlite
        # uses by default on sm90 and which round every partial sum: 3% off at 1 row on the 7B shape's gate/up stack
        gemlite.set_native_atomic_bfp16(False)
        from .gemlite_tuned import load as load_tuned  # sdgrpo's tuned configurations over gemlite's, once

        load_tuned(torch.cuda.get_device_name(device))
        probe = GemLiteLinear(4, group_size=self.group, in_features=self.in_features, out_features=self.out_features,
                              input_dtype=DType.BF16, output_dtype=DType.BF16)
        zeros = torch.zeros(self.out_features, self.in_features // self.group, dtype=torch.bfloat16, device=device)
        probe.pack(torch.zeros(self.out_features, self.in_features, dtype=torch.uint8, device=device), zeros + 1,
                   zeros, bias=None, fma_mode=True, packing_bitwidth=32)
        if (tuple(probe.W_q.shape), probe.W_q.dtype) != (tuple(self.W_q.shape), self.W_q.dtype):
            raise RuntimeError(f"gemlite packed a {tuple(probe.W_q.shape)} {probe.W_q.dtype} weight where "
                               f"{tuple(self.W_q.shape)} int32 was expected: a gemlite version with another layout")
        return probe.get_meta_args(), probe.get_tensor_args()[3:]

    @staticmethod
    def nbytes(out_features: int, in_features: int, group: int) -> int:
        meta = gemlite_meta_rows(in_features, group) * out_features * 4  # scales and zeros, bf16, padded
        return out_features * in_features // 2 + meta + out_features * 2

    # gemlite's layout keeps rows apart ([K / 8, N]: row n is column n): rows are packed as they are loaded, with no
    # values tensor of the whole copy between load and pack
    packs_rows = True

    def release(self) -> None:
        """Free the copy's weights, scales and zeros (a generation's copies between calls, ``Quantised.hold``
        false); :meth:`reacquire` allocates them again (the scales' padding zeroed, as gemlite's kernels read it)."""
        self.W_q.data = self.W_q.data.new_empty(0)
        self._meta_store = []
        self.scales.data = self.scales.data.new_empty(0)
        self.zeros.data = self.zeros.data.new_empty(0)

    def reacquire(self, device) -> None:
        """The copy's tensors allocated (zeros) where they are not: at construction, and after :meth:`release`."""
        if self.W_q.numel():
            return
        self.W_q.data = torch.zeros(self.in_features // 8, self.out_features, dtype=torch.int32, device=device)
        # K / group rows used, held in zeros to gemlite_meta_rows: the kernels read past the end (GEMLITE_SPLIT_K_MAX)
        groups, rows = self.in_features // self.group, gemlite_meta_rows(self.in_features, self.group)
        self._meta_store = [torch.zeros(rows, self.out_features, dtype=torch.bfloat16, device=device) for _ in range(2)]
        self.scales.data, self.zeros.data = self._meta_store[0][:groups], self._meta_store[1][:groups]

    @torch.no_grad()
    def load(self, values, start: int, weight: torch.Tensor, owned: bool = False) -> None:
        """Rows ``start:start + len(weight)`` of a float weight quantised and packed into the copy, with their scales
        and lows (:func:`quantise_affine_words_`); ``values`` is not used. ``owned``: ``weight`` is a float32 tensor
        the caller gives up (overwritten), else a float32 copy is made. On CUDA one Triton kernel does the same in
        one read of ``weight`` (:mod:`.int4_pack`, the same values to the bit), which it leaves as it is."""
        if weight.is_cuda and TRITON_PACK:
            from .int4_pack import quantise_pack_into

            return quantise_pack_into(weight, self.W_q, self.scales, self.zeros, start, self.group)
        owned = owned and weight.dtype == torch.float32 and weight.is_contiguous()
        words, scale, low = quantise_affine_words_(weight if owned else weight.to(torch.float32, copy=True),
                                                   self.group)
        rows = slice(start, start + weight.size(0))
        self.W_q[:, rows] = words.t()
        self.scales[:, rows] = scale.t()
        self.zeros[:, rows] = low.t()

    def pack(self, values) -> None:
        pass  # packed by load

    def dequantised(self) -> torch.Tensor:
        """W as the kernel reads it, bf16 [N, K]."""
        q = unpack_gemlite(self.W_q).float().view(self.out_features, -1, self.group)
        w = q * self.scales.t().float()[..., None] + self.zeros.t().float()[..., None]
        return w.reshape(self.out_features, self.in_features).to(torch.bfloat16)

    def forward(self, x):
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        rows, slice_rows = flat.size(0), GEMLITE_PREFILL_SLICE
        if not slice_rows or rows <= slice_rows:
            out = self._matmul(flat)
        else:  # slices of slice_rows, the last zero-padded: every call one of gemlite's row buckets
            padded = flat.new_zeros(-(-rows // slice_rows) * slice_rows, self.in_features)
            padded[:rows] = flat
            out = torch.cat([self._matmul(part) for part in padded.split(slice_rows)])[:rows]
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _matmul(self, flat):
        if self._meta_args is None:
            return torch.nn.functional.linear(flat, self.dequantised(), self.bias)
        from gemlite import forward_functional

        return forward_functional(flat, self.bias, [self.W_q, self.scales, self.zeros, *self._tensor_extra],
                                  self._meta_args, self.matmul_type)


# Which kernel reads int4 generation copies. Measured on one H100 (benchmarks/results/bench_int4_qwen2.5-7b_h100_
# 2026-12-06.json: the 7B shape's 28 x 4 projection groups in one CUDA graph, ms per token step; their bf16 bytes need
# 4.34 ms at the copy bandwidth, int4's about 1.2): bf16 5.0 at 1-32 rows; gemlite (groups of 64) 2.4 / 4.1 / 5.1 /
# 4.9 at 1 / 8 / 16 / 32 rows; tinygemm 2.1 / 4.7 / 7.9 / 14.7; bitsandbytes NF4 (the base as it is) 3.6 / 9.7 / 9.6
# / 9.4. So on an H100 gemlite reads a quarter of the bytes at least as fast as bf16 at every row count a generation
# decodes, tinygemm only below 16 rows. gemlite 0.6's split-K kernels read group scales and zeros past the last group,
# unmasked, where the input width is not a multiple of BLOCK_SIZE_K x SPLIT_K (896 on the Qwen2.5-0.5B shape decoded to
# NaN there on 2026-12-07); GemliteLinear holds them zero-padded that far (gemlite_meta_rows). With the padding, on one
# H100 (2026-12-07, commit e53ce2f): the 0.5B's widths 896 / 1,152 / 4,864 / 9,728 and the 7B's read as gemlite's
# reference eagerly and from a CUDA graph at 1-40 rows (NaN written into the padding shows the 8- and 40-row kernels
# read it), and a 4-bit base decodes through them as the reference does (argmax agreement 1.000, 0.0055 nats a token).
INT4_KERNELS = ("auto", "gemlite", "tinygemm")
# The kernels that decode int4 copies at least as fast as 16-bit copies are read (above): with ``generation_weights``
# auto, a quantised base then gets int4 copies first (a quarter of the memory), not 16-bit ones.
INT4_FIRST = ("gemlite",)
# Where auto picks gemlite: the architectures (compute capability) where it was measured to read int4 copies faster
# than tinygemm at the engine's row counts and decodes as the reference does: an H100 (sm 9.0; 7B layers, ms per token
# step at 1 / 8 / 16 / 32 rows: gemlite g64 2.39 / 4.13 / 5.08 / 4.89, tinygemm 2.12 / 4.72 / 7.89 / 14.7). Nothing was
# measured on other architectures (bitsandbytes' and gemlite's own calibrations differ there): tinygemm.
GEMLITE_AUTO: tuple[tuple[int, int], ...] = ((9, 0),)


def auto_int4_kernel(device=None) -> tuple[str, str]:
    """(kernel, why) that ``--generation_int4_kernel auto`` reads int4 copies with on ``device`` (the current CUDA
    device when None): gemlite on the architectures of :data:`GEMLITE_AUTO` where it is installed, else tinygemm."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return "tinygemm", "auto"
    capability = torch.cuda.get_device_capability(device)
    if capability not in GEMLITE_AUTO:
        return "tinygemm", f"auto: gemlite not chosen on sm {capability[0]}.{capability[1]} (engine.GEMLITE_AUTO)"
    reason = gemlite_available()
    if reason is not None:
        return "tinygemm", f"auto: {reason}"
    return "gemlite", f"auto: the fastest measured on sm {capability[0]}.{capability[1]}"


def choose_int4_kernel(asked: str, device) -> tuple[str, str]:
    """(kernel, why) for int4 copies on ``device``: ``asked`` where it can run; auto: :func:`auto_int4_kernel`.
    Raises :class:`UserError` when gemlite is asked for on a GPU where it cannot run (:func:`gemlite_available`);
    off CUDA it is its reference matmul (tests)."""
    if asked not in INT4_KERNELS:
        raise ValueError(f"int4 kernel {asked!r} is not one of {list(INT4_KERNELS)}")
    if asked == "auto":
        return auto_int4_kernel(device)
    if asked == "tinygemm":
        return "tinygemm", "as asked"
    if torch.device(device).type != "cuda":
        return "gemlite", "as asked (off CUDA: its reference matmul)"
    reason = gemlite_available()
    if reason is not None:
        from sdgrpo.errors import UserError

        raise UserError(f"--generation_int4_kernel gemlite: {reason}; install it or use tinygemm")
    return "gemlite", "as asked"
