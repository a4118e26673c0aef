"""The ``'triton'`` implementation of :func:`overlock_mm.ops.na2d_av`: hand-written Triton kernels.

Three kernels on the package layout (contiguous; ``BG = B * G``, ``T = k * k``)::

    attn [BG, T, H, W]      value / out / grad_out / grad_value [BG, D, H, W]

**The taps of one row are a band matrix.** For output row ``i``, tap row ``a`` and a run of
``BLOCK_J`` output columns ``j`` whose windows start at ``sj(j)`` (clamped, never padded), the
``k`` taps ``b`` read value columns ``sj(j) + b``. All of them lie in one window of
``BLOCK_Q >= BLOCK_J + k - 1`` columns starting at ``c0 = sj(first j)`` (the forward may start
it up to 3 columns earlier, see below), so::

    out[d, i, j] += sum_q V[d, q] * A[q, j]      V[d, q] = value[d, si(i) + a, c0 + q]
                                                 A[q, j] = attn[a*k + (c0 + q - sj(j)), i, j]
                                                           if 0 <= c0 + q - sj(j) < k, else 0

a ``[BLOCK_D, BLOCK_Q] x [BLOCK_Q, BLOCK_J]`` matrix product (``tl.dot``). The product's
register tiling makes each loaded value feed many multiply-adds, which a tap-by-tap kernel cannot
(one L1 load per multiply-add: this file's earlier kernels, 1.0-4.4x slower on an H100, see
docs/performance.md). The price is ``BLOCK_Q / k`` multiply-adds per useful one (2.5 at k = 13),
on tensor cores that have them to spare.

The forward loads A in the attention's own layout -- ``[k taps, BLOCK_J columns]``, one run of
consecutive columns per tap -- and builds the band in registers (``tl.gather`` along the taps):
loading the band directly walks its diagonals, one scattered 4-byte access per element. Where
the row length and the addresses allow (:func:`alignment`), the value window starts on a multiple
of 4 (or 2) columns, so both loads are 16- (8-) byte vectors. On an H200 that made the forward
1.1-1.4x faster (docs/performance.md); the two backward kernels still load their bands directly.

* forward: a program owns one output row, ``BLOCK_J`` columns and up to ``BLOCK_D`` channels and
  accumulates ``k`` band products, one per tap row;
* grad_attn (``sum_d grad_out[d, i, j] * value[d, nbr_t(i, j)]``): a program owns one output row,
  ``BLOCK_J`` columns and one tap row ``a`` (the grid's second axis). One product
  ``grad_out[j, d] x value[d, q]`` over all ``D`` channels gives ``S[j, q]``, whose band
  ``b = c0 + q - sj(j)`` in ``[0, k)`` is ``grad_attn[a*k + b, i, j]`` (a masked store);
* grad_value: the transposed band, gathered over each source pixel's *inverse neighbourhood* (no
  atomics, deterministic). A program owns source row ``p`` and ``BLOCK_Q`` source columns. The
  output rows whose clamped window holds row ``p`` form one contiguous range, and so do the
  output columns for a source column (``L`` the axis length, ``r = k // 2``)::

      i_lo(p) = 0            if p < k       else p - r
      i_hi(p) = L - 1        if p >= L - k  else p + r

  (``start(i) <= p`` fails only for ``i > p + r`` when ``p < L - k``; ``start(i) >= p - k + 1``
  fails only for ``i < p - r`` when ``p >= k``.) The range holds ``k`` rows in the interior, up to
  ``k + r`` next to a border and at most ``L`` when ``L < 2k``. For each such row ``i`` (tap row
  ``a = p - si(i)``) the tile's output-column range is taken in chunks of
  ``next_pow2(BLOCK_Q + k - 1)`` columns (one chunk in the interior):
  ``grad_out[d, j] x A'[j, q]``, ``A'[j, q] = attn[a*k + (q - sj(j)), i, j]`` inside the band.

Precision: float32 operands go through ``tl.dot`` as three TF32 products (``tf32x3``: each
operand split into a TF32 head and tail, only the tail x tail term dropped), about float32
accuracy (measured within 1.2e-5 of float64 at k = 13, D = 16, where summing tap by tap in
float32 was within 3e-5); a single TF32 product would not be (10 mantissa bits). fp16 / bf16
inputs (autocast) are widened to float32, where one TF32 pass is exact (their 10 / 7 mantissa
bits fit), and accumulated in float32; outputs have the input dtype. float64 is not handled
(``tl.dot`` in float64 did not compile with triton 3.6 on an H100): :func:`na2d_av_triton` sends
it to ``'native'``.

Input sizes vary (detection batches): only ``k``, the dtype, the tiles and the forward's vector
width (1, 2 or 4 floats, from the row length) are compile-time constants; ``D``, ``H``, ``W`` and
the tile counts are runtime arguments, so a new map size does not compile a new kernel -- apart
from those three widths and Triton's own specialisation of integer arguments (equal to 1,
divisible by 16), which bound the variants per kernel and ``k`` to a handful, each compiled once
and kept in Triton's on-disk cache.

State kept for backward: ``attn`` and ``value`` only (``O(B*G*H*W*(k*k + D))``), like ``'native'``.
Inputs must be contiguous: the wrapper makes them so and the raw launchers raise otherwise.

Interpreter (triton 3.8): :func:`triton.jit` decides between compiling and Triton's CPU
interpreter when it *decorates* a function, from ``TRITON_INTERPRET`` (read through
``triton.knobs.runtime.interpret`` on every access). The kernels below are therefore plain
functions decorated lazily by :func:`_kernels`, cached per interpreter setting, and they call
Triton builtins only: triton's own ``@jit`` library helpers (``tl.sum``, ``tl.max``, ``tl.cdiv``,
``tl.zeros``) are decorated when ``triton.language`` is imported, so a kernel using them can only
be interpreted if ``TRITON_INTERPRET=1`` was set before ``import triton``. With that design the
variable may be set at any time before a call; with ``TRITON_INTERPRET=1`` the implementation
runs on CPU tensors (that is how the tests check it without a GPU). The interpreter of triton
<= 3.6 with numpy >= 2.4 cannot run loops with a runtime bound (triton-lang/triton#9171, seen
with triton 3.6.0); compiled kernels are unaffected.

Tile sizes (``TILES``) are static per kernel; see :data:`TILES` for how they were chosen and how
to override them.
"""
import contextlib
import functools
import json
import os
from typing import Callable, Dict, Tuple

import torch
import triton
import triton.language as tl

from .neighborhood import (_as_operand, _check_inputs, _compute_dtype, _na2d_av_native,
                           apply_lean, lean_av_function)

#: Tile sizes per kernel (compile-time constants; ``num_warps`` and ``num_stages`` are Triton's
#: launch options, ``num_stages`` the software-pipelining depth of the kernels' loops):
#:
#: * ``BLOCK_J`` (forward, grad_attn): most output columns per program, a power of two; the
#:   forward takes fewer where that keeps the band's window small (:func:`band`);
#: * ``BLOCK_Q`` (grad_value): source columns per program;
#: * ``BLOCK_D`` (forward, grad_value): most channels per program; ``D`` is padded to a power of
#:   two up to this (masked), a larger ``D`` is split over the grid's second axis. grad_attn
#:   always takes all ``D`` channels (its product runs over them).
#:
#: The values are the fastest of 12 configurations per kernel measured side by side on an NVIDIA
#: H100 (triton 3.6, torch 2.11; OverLoCK-T/S/XT detection and segmentation maps, batch 1 and 8;
#: docs/performance.md): one warp per program beat two to eight nearly everywhere, and grad_value
#: without software pipelining (``num_stages=1``) was 1.3-2.2x faster than with Triton's default
#: of 3. The forward's tiles are from a second comparison on an NVIDIA H200 (triton 3.6), after its
#: attention loads became coalesced: 8 columns beat 16 by 1.1-1.5x and 32 by 2.0-4.4x at every
#: map measured (k = 5, 7, 13), and won ``tune_triton.py`` against nine other tiles.
#: ``OVERLOCK_TRITON_TILES=/path/tiles.json`` overrides them (same structure, any subset), e.g.
#: with the choice ``tools/analysis/tune_triton.py`` measured on another GPU.
TILES: Dict[str, Dict[str, int]] = {
    'forward': dict(BLOCK_J=8, BLOCK_D=16, num_warps=1, num_stages=3),
    'grad_attn': dict(BLOCK_J=16, num_warps=1, num_stages=3),
    'grad_value': dict(BLOCK_Q=8, BLOCK_D=16, num_warps=1, num_stages=1),
}
TILES_ENV = 'OVERLOCK_TRITON_TILES'

#: the supported input dtypes and their ``tl.dot`` precision (module docstring: why ``tf32x3`` for
#: float32, and why one TF32 pass is exact for fp16 / bf16 widened to float32). Every kernel
#: widens its loaded tiles to float32 and accumulates in float32.
_PREC = {torch.float16: 'tf32', torch.bfloat16: 'tf32', torch.float32: 'tf32x3'}
#: the least length of a product's reduction axis (the band window, grad_value's column chunk,
#: grad_attn's channels): an 8-column window (k = 5, 4 columns) failed to compile in float32
#: (tf32x3) with triton 3.6 on an H100; 16 compiled at every size measured
MIN_DOT_K = 16


# --------------------------------------------------------------------------------------------
# Kernel bodies. Plain functions, decorated by _jit(): see the module docstring for why.
#
# They use Triton *builtins* only (tl.full, tl.where, tl.minimum, tl.dot, ...), none of the
# library helpers that triton.language itself defines with @jit (tl.zeros, tl.cdiv, tl.sum,
# tl.max): those are decorated once, when triton.language is imported, so they stay
# compiled-only if TRITON_INTERPRET is set later -- and then the interpreter cannot run a kernel
# calling them.
#
# ``K`` (the kernel size) is a compile-time constant. Program ids are flattened over
# (batch * group, row, column tile). The per-(batch, group) base offsets are int64: attn has
# B*G*k*k*H*W elements, which exceeds 2**31 for large batches at k = 13; offsets inside one
# plane stay int32. Loaded tiles are widened to float32 before the product (see _PREC).
# --------------------------------------------------------------------------------------------

def _fwd_body(attn_ptr, value_ptr, out_ptr, D, H, WA, n_jb, K: tl.constexpr, KP: tl.constexpr,
              BLOCK_J: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
              PREC: tl.constexpr, ALIGN: tl.constexpr):
    R: tl.constexpr = K // 2
    # W arrives divided by ALIGN (1, 2 or 4): multiplied back here, the compiler knows every row
    # start is a multiple of ALIGN elements and emits vector loads of ALIGN floats (module docs).
    W = WA * ALIGN
    HW = H * W
    pid = tl.program_id(0)
    bg = (pid // (H * n_jb)).to(tl.int64)
    i = pid // n_jb % H
    j0 = pid % n_jb * BLOCK_J
    j = j0 + tl.arange(0, BLOCK_J)
    jm = j < W
    si = tl.minimum(tl.maximum(i - R, 0), H - K)  # clamped window start (NATTEN 0.17)
    sj = tl.minimum(tl.maximum(j - R, 0), W - K)
    # the band's first value column, rounded down to a multiple of ALIGN (the launcher sized
    # BLOCK_Q for the extra ALIGN - 1 columns)
    c0 = tl.minimum(tl.maximum(j0 - R, 0), W - K) // ALIGN * ALIGN
    cols = c0 + tl.arange(0, BLOCK_Q)
    b = cols[:, None] - sj[None, :]  # [BLOCK_Q, BLOCK_J]: tap column, valid in [0, K)
    am = (b >= 0) & (b < K) & jm[None, :]
    tap = tl.minimum(tl.maximum(b, 0), KP - 1)  # where band entry (q, j) sits in the row's taps
    t = tl.arange(0, KP)
    # one tap row's attention in its own layout: [KP taps, BLOCK_J columns], each tap a run of
    # consecutive columns (coalesced, vectorised); rows t >= K are padding
    n_ptrs = attn_ptr + bg * (K * K) * HW + t[:, None] * HW + (i * W + j)[None, :]
    nm = (t < K)[:, None] & jm[None, :]
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    vm = dm[:, None] & (cols < W)[None, :]
    v_ptrs = value_ptr + bg * D * HW + d[:, None] * HW + si * W + cols[None, :]
    acc = tl.full([BLOCK_D, BLOCK_J], 0.0, dtype=tl.float32)
    for a in range(K):
        taps = tl.load(n_ptrs + a * K * HW, mask=nm, other=0.0).to(tl.float32)
        band = tl.where(am, tl.gather(taps, tap, 0), 0.0)  # [BLOCK_Q, BLOCK_J], in registers
        v = tl.load(v_ptrs + a * W, mask=vm, other=0.0).to(tl.float32)
        acc = tl.dot(v, band, acc, input_precision=PREC)
    o_ptrs = out_ptr + bg * D * HW + d[:, None] * HW + (i * W + j)[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=dm[:, None] & jm[None, :])


def _grad_attn_body(grad_out_ptr, value_ptr, grad_attn_ptr, D, H, W, n_jb, K: tl.constexpr,
                    BLOCK_J: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
                    PREC: tl.constexpr):
    R: tl.constexpr = K // 2
    HW = H * W
    pid = tl.program_id(0)
    bg = (pid // (H * n_jb)).to(tl.int64)
    i = pid // n_jb % H
    j0 = pid % n_jb * BLOCK_J
    a = tl.program_id(1)  # this program's tap row
    j = j0 + tl.arange(0, BLOCK_J)
    jm = j < W
    si = tl.minimum(tl.maximum(i - R, 0), H - K)
    sj = tl.minimum(tl.maximum(j - R, 0), W - K)
    c0 = tl.minimum(tl.maximum(j0 - R, 0), W - K)
    cols = c0 + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)  # all channels (padded, masked)
    dm = d < D
    # go [BLOCK_J, BLOCK_D], v [BLOCK_D, BLOCK_Q]
    go = tl.load(grad_out_ptr + bg * D * HW + d[None, :] * HW + (i * W + j)[:, None],
                 mask=jm[:, None] & dm[None, :], other=0.0).to(tl.float32)
    v = tl.load(value_ptr + bg * D * HW + d[:, None] * HW + (si + a) * W + cols[None, :],
                mask=dm[:, None] & (cols < W)[None, :], other=0.0).to(tl.float32)
    s = tl.dot(go, v, tl.full([BLOCK_J, BLOCK_Q], 0.0, dtype=tl.float32), input_precision=PREC)
    b = cols[None, :] - sj[:, None]  # [BLOCK_J, BLOCK_Q]: keep the band
    ga_ptrs = grad_attn_ptr + bg * (K * K) * HW + (a * K + b) * HW + (i * W + j)[:, None]
    tl.store(ga_ptrs, s.to(grad_attn_ptr.dtype.element_ty), mask=(b >= 0) & (b < K) & jm[:, None])


def _grad_value_body(attn_ptr, grad_out_ptr, grad_value_ptr, D, H, W, n_qb, K: tl.constexpr,
                     BLOCK_Q: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
                     PREC: tl.constexpr):
    R: tl.constexpr = K // 2
    HW = H * W
    pid = tl.program_id(0)
    bg = (pid // (H * n_qb)).to(tl.int64)
    p = pid // n_qb % H  # source row
    q0 = pid % n_qb * BLOCK_Q
    q = q0 + tl.arange(0, BLOCK_Q)  # source columns
    qm = q < W
    q1 = tl.minimum(q0 + BLOCK_Q, W) - 1
    # output rows whose window holds row p; output columns whose window holds a column q0..q1
    # (one contiguous range each, module docstring)
    i_lo = tl.where(p < K, 0, p - R)
    i_hi = tl.where(p >= H - K, H - 1, p + R)
    j_lo = tl.where(q0 < K, 0, q0 - R)
    j_hi = tl.where(q1 >= W - K, W - 1, q1 + R)
    n_chunks = (j_hi - j_lo + BLOCK_J) // BLOCK_J
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    a_base = attn_ptr + bg * (K * K) * HW
    go_base = grad_out_ptr + bg * D * HW + d[:, None] * HW
    acc = tl.full([BLOCK_D, BLOCK_Q], 0.0, dtype=tl.float32)
    for i in range(i_lo, i_hi + 1):
        a = p - tl.minimum(tl.maximum(i - R, 0), H - K)  # tap row through which i reads row p
        for c in range(n_chunks):
            j = j_lo + c * BLOCK_J + tl.arange(0, BLOCK_J)
            jm = j <= j_hi
            b = q[None, :] - tl.minimum(tl.maximum(j - R, 0), W - K)[:, None]  # [J, Q]
            am = (b >= 0) & (b < K) & jm[:, None] & qm[None, :]
            band = tl.load(a_base + (a * K + b) * HW + (i * W + j)[:, None], mask=am,
                           other=0.0).to(tl.float32)
            go = tl.load(go_base + (i * W + j)[None, :], mask=dm[:, None] & jm[None, :],
                         other=0.0).to(tl.float32)
            acc = tl.dot(go, band, acc, input_precision=PREC)
    gv_ptrs = grad_value_ptr + bg * D * HW + d[:, None] * HW + (p * W + q)[None, :]
    tl.store(gv_ptrs, acc.to(grad_value_ptr.dtype.element_ty), mask=dm[:, None] & qm[None, :])


def inverse_range(p: int, length: int, kernel_size: int) -> Tuple[int, int]:
    """``(lo, hi)``: the positions whose clamped window contains ``p`` are ``lo..hi`` (inclusive).

    The Python twin of the grad_value kernel's formula (tested against a brute-force scan).
    """
    k, r = kernel_size, kernel_size // 2
    return (0 if p < k else p - r), (length - 1 if p >= length - k else p + r)


def max_inverse_range(length: int, kernel_size: int) -> int:
    """The longest inverse range on an axis: ``L`` if ``L < 2k``, else ``k + r`` (``p = k - 1``)."""
    k = kernel_size
    return length if length < 2 * k else k + k // 2


@functools.lru_cache(maxsize=None)
def _jit(interpret: bool) -> Dict[str, Callable]:
    # ``interpret`` is only the cache key: triton.jit reads the setting itself while decorating.
    del interpret
    return {'forward': triton.jit(_fwd_body), 'grad_attn': triton.jit(_grad_attn_body),
            'grad_value': triton.jit(_grad_value_body)}


@torch.compiler.assume_constant_result  # a torch.compile trace reads it once (not traceable)
def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, 'knobs', None)  # triton >= 3.4; older ones read the variable
    if knobs is None:
        return os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')
    return bool(knobs.runtime.interpret)


def _kernels() -> Dict[str, Callable]:
    """The three kernels, compiled or interpreted as ``TRITON_INTERPRET`` says right now."""
    return _jit(interpreting())


# --------------------------------------------------------------------------------------------
# Launchers (no autograd). Contiguous tensors of one dtype on one device.
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _read_tiles_file(path: str) -> Dict[str, Dict[str, int]]:
    """``TILES`` updated from a JSON file (``OVERLOCK_TRITON_TILES``), validated; read once per
    path."""
    hint = (f'{TILES_ENV}={path}: expected JSON like {json.dumps(TILES)} (any subset), e.g. '
            'written by tools/analysis/tune_triton.py; unset the variable to use the defaults.')
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f'cannot read Triton tiles: {e}. {hint}') from None
    if not isinstance(data, dict):
        raise ValueError(f'Triton tiles must be a JSON object. {hint}')
    tiles = {name: dict(cfg) for name, cfg in TILES.items()}
    for name, cfg in data.items():
        if name not in tiles or not isinstance(cfg, dict):
            raise ValueError(f'unknown Triton kernel {name!r} (valid: {sorted(tiles)}). {hint}')
        for key, val in cfg.items():
            if key not in tiles[name]:
                raise ValueError(f'unknown tile {key!r} for {name!r} (valid: '
                                 f'{sorted(tiles[name])}). {hint}')
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f'{name}.{key} must be a positive integer, got {val!r}. {hint}')
            if key != 'num_stages' and val & (val - 1):
                raise ValueError(f'{name}.{key} must be a power of two, got {val!r}. {hint}')
            tiles[name][key] = val
    return tiles


def tiles(name: str) -> Dict[str, int]:
    """The tile sizes kernel ``name`` launches with: ``TILES``, or the file in ``TILES_ENV``."""
    path = os.environ.get(TILES_ENV)
    return dict((_read_tiles_file(path) if path else TILES)[name])


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError('na2d triton kernels need contiguous tensors; got strides '
                             f'{t.stride()} for shape {tuple(t.shape)}.')
        if t.dtype not in _PREC:
            raise TypeError(f'na2d triton kernels support {sorted(map(str, _PREC))}, '
                            f'got {t.dtype}.')
    if len({(t.dtype, t.device) for t in tensors}) != 1:
        raise ValueError('na2d triton kernels need all tensors in one dtype on one device.')


def band(k: int, max_j: int) -> Tuple[int, int]:
    """``(BLOCK_J, BLOCK_Q)`` of the forward at kernel size ``k``, before alignment.

    ``BLOCK_J`` output columns read a window of ``BLOCK_Q = next_pow2(BLOCK_J + k - 1)`` value
    columns, ``k`` of them per output. The forward takes the largest ``BLOCK_J <= max_j`` whose
    window fits ``next_pow2(2k)`` columns (with the default ``max_j = 8`` that caps nothing below
    k = 25). Windows are at least ``MIN_DOT_K`` columns. :func:`alignment` may then widen the
    window by up to 3 columns, never past the next power of two.
    """
    window = max(MIN_DOT_K, triton.next_power_of_2(2 * k))
    j = min(max_j, 1 << ((window - k + 1).bit_length() - 1))
    return j, max(MIN_DOT_K, triton.next_power_of_2(j + k - 1))


def alignment(k: int, block_j: int, block_q: int, width: int, *tensors: torch.Tensor) -> int:
    """The forward's vector width ``ALIGN``: 4, 2 or 1 floats.

    The largest of them that divides ``width`` (so every row of every plane starts on a
    multiple of it), divides every tensor's address in elements, and still fits the band window
    ``block_q`` chosen by :func:`band` after rounding its first column down to a multiple of it:
    ``block_j + k - 1 + ALIGN - 1 <= block_q``. (Doubling the window for wider vectors was not
    measured as such; wider windows were slower wherever measured, e.g. 1.4x at k = 7 on an
    H200: 16 columns in 32 against 8 in 16.)
    """
    for align in (4, 2):
        if (width % align == 0 and block_j + k - 1 + align - 1 <= block_q
                and all(t.data_ptr() % (align * t.element_size()) == 0 for t in tensors)):
            return align
    return 1


def _launch(name: str, args: Tuple[torch.Tensor, ...], value_like: torch.Tensor, k: int) -> None:
    # plain ints: under torch.jit.trace (FLOP counting) sizes are traced 0-d tensors, which
    # Triton's launcher would take for pointers
    b, g, d, h, w = (int(n) for n in value_like.shape)
    tile = tiles(name)
    options = dict(num_warps=tile.pop('num_warps'), num_stages=tile.pop('num_stages'))
    if name == 'grad_attn':  # one tap row per program (second axis), all channels at once
        tile['BLOCK_Q'] = triton.next_power_of_2(tile['BLOCK_J'] + k - 1)
        tile['BLOCK_D'] = max(MIN_DOT_K, triton.next_power_of_2(d))
        n_cols, second = triton.cdiv(w, tile['BLOCK_J']), k
    else:  # D rounded up to a power of two (masked), at most BLOCK_D per program
        if name == 'forward':
            tile['BLOCK_J'], tile['BLOCK_Q'] = band(k, tile['BLOCK_J'])
            tile['KP'] = triton.next_power_of_2(k)
            tile['ALIGN'] = alignment(k, tile['BLOCK_J'], tile['BLOCK_Q'], w, *args)
            n_cols = triton.cdiv(w, tile['BLOCK_J'])
        else:  # grad_value: output columns in chunks; one covers an interior tile's range
            tile['BLOCK_J'] = max(MIN_DOT_K, triton.next_power_of_2(tile['BLOCK_Q'] + k - 1))
            n_cols = triton.cdiv(w, tile['BLOCK_Q'])
        # at least 8 rows: smaller products were not measured to compile (S's stage 4 has D = 8)
        tile['BLOCK_D'] = min(triton.next_power_of_2(max(d, 8)), tile['BLOCK_D'])
        second = triton.cdiv(d, tile['BLOCK_D'])
    kernel = _kernels()[name]
    # Triton launches on the current CUDA device; make it the tensors' one.
    device = value_like.device
    ctx = torch.cuda.device(device) if device.type == 'cuda' else contextlib.nullcontext()
    # the forward gets W // ALIGN and multiplies it back (see _fwd_body)
    width = w // tile.get('ALIGN', 1)
    with ctx:
        kernel[(b * g * h * n_cols, second)](*args, d, h, width, n_cols, K=k,
                                             PREC=_PREC[value_like.dtype], **options, **tile)


def forward(attn: torch.Tensor, value: torch.Tensor, k: int) -> torch.Tensor:
    """``out [B, G, D, H, W]`` from contiguous ``attn [B, G, k*k, H, W]`` and ``value``."""
    _check(attn, value)
    out = torch.empty_like(value)
    _launch('forward', (attn, value, out), value, k)
    return out


def grad_attn(grad_out: torch.Tensor, value: torch.Tensor, k: int) -> torch.Tensor:
    """``grad_attn [B, G, k*k, H, W]``: per tap, ``grad_out`` dotted with the neighbour's value."""
    _check(grad_out, value)
    b, g, _, h, w = value.shape
    gattn = value.new_empty((b, g, k * k, h, w))
    _launch('grad_attn', (grad_out, value, gattn), value, k)
    return gattn


def grad_value(grad_out: torch.Tensor, attn: torch.Tensor, k: int) -> torch.Tensor:
    """``grad_value [B, G, D, H, W]``: a gather over each source pixel's inverse neighbourhood."""
    _check(grad_out, attn)
    gvalue = torch.empty_like(grad_out)
    _launch('grad_value', (attn, grad_out, gvalue), grad_out, k)
    return gvalue


# Saves ``attn`` and ``value`` only; both gradients come from the Triton kernels.
_TritonNeighborhoodAV = lean_av_function('_TritonNeighborhoodAV', forward, grad_attn,
                                         grad_value, op_prefix='na2d_triton')


def can_run(device: torch.device) -> bool:
    """CUDA tensors always; CPU tensors only under the interpreter (``TRITON_INTERPRET=1``)."""
    return device.type == 'cuda' or (device.type == 'cpu' and interpreting())


def na2d_av_triton(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``na2d_av`` through the Triton kernels; ``'native'`` where they cannot run (tensors on
    different devices, CPU tensors outside the interpreter, float64).

    Args:
        attn (Tensor): ``[B, G, k*k, H, W]`` weights.
        value (Tensor): ``[B, G, D, H, W]`` values; ``H, W >= kernel_size``.
        kernel_size (int): odd window size ``k``.

    Returns:
        Tensor: ``[B, G, D, H, W]`` in the autocast dtype under autocast, otherwise in the
        promoted dtype of the inputs (as ``'native'``).
    """
    _check_inputs(attn, value, kernel_size)
    dtype = _compute_dtype(attn, value)
    if attn.device != value.device or not can_run(value.device) or dtype not in _PREC:
        return _na2d_av_native(attn, value, kernel_size)
    # Same casting rule as 'native': autocast decides the dtype, the kernels accumulate in fp32.
    return apply_lean(_TritonNeighborhoodAV, _as_operand(attn, dtype), _as_operand(value, dtype),
                      kernel_size)
