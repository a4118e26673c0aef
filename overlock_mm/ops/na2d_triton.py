"""The ``'triton'`` implementation of :func:`overlock_mm.ops.na2d_av`: hand-written Triton kernels.

Three kernels, all on the package layout (contiguous; ``BG = B * G``, ``T = k * k``)::

    attn [BG, T, H, W]      value / out / grad_out / grad_value [BG, D, H, W]

* forward: a program owns a tile of ``BLOCK_P`` pixels (flattened over ``H * W``, pixels on the
  fast axis so the per-tap loads of consecutive interior pixels are coalesced) and ``BLOCK_D``
  channels, and walks the ``k * k`` taps accumulating in registers;
* grad_attn (``sum_d grad_out[d, i, j] * value[d, nbr_t(i, j)]``): a program owns a pixel tile and
  one tap row ``a`` (the grid's second axis, so small maps still give the GPU enough programs) and
  keeps a ``[k, BLOCK_P]`` accumulator (``k`` padded to a power of two) that it streams over the
  ``D`` channels -- each lane owns its own outputs, so there is no cross-lane reduction and any
  ``D`` works without channel tiles;
* grad_value: a *gather over the inverse neighbourhood*, like the C++ CPU kernel, so there are no
  atomics and the result is deterministic. For source row ``p`` the output rows whose clamped
  window contains ``p`` form one contiguous range (``start(i)`` is non-decreasing in ``i``)::

      i_lo(p) = 0            if p < k       else p - r
      i_hi(p) = L - 1        if p >= L - k  else p + r

  (``start(i) <= p`` fails only for ``i > p + r`` when ``p < L - k``; ``start(i) >= p - k + 1``
  fails only for ``i < p - r`` when ``p >= k``.) The range holds ``k`` rows in the interior,
  up to ``k + r`` next to a border (the ``r + 1`` border rows that share the edge window) and at
  most ``L`` when ``L < 2k`` (the longest range is ``L`` if ``L < 2k``, else ``k + r``). Output
  row ``i`` reads ``p`` through tap row ``a = p - start(i)``. A program whose tile is interior
  along an axis loops exactly ``k`` times on it; a border tile loops over the axis' longest range
  and masks the shorter ones (up to ``1.5x`` the work on border tiles, none elsewhere).

State kept for backward: ``attn`` and ``value`` only (``O(B*G*H*W*(k*k + D))``), like ``'native'``.
float16 / bfloat16 (autocast) inputs are read as they are and accumulated in float32 (float64 in
float64); outputs have the input dtype. Inputs must be contiguous: the wrapper makes them so and
the raw launchers raise otherwise.

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

from .neighborhood import lean_av_function

#: Tile sizes per kernel (compile-time constants; ``num_warps`` is Triton's launch option):
#:
#: * ``BLOCK_P``: pixels per program (flattened ``H * W``), a power of two;
#: * ``BLOCK_D`` (forward, grad_value): most channels per program; ``D`` is padded to a power of
#:   two up to this (masked), a larger ``D`` is split over the grid's second axis;
#: * ``D_UNROLL`` (grad_attn): channels per unrolled step of its channel loop.
#:
#: The values are what ``tools/analysis/tune_triton.py`` chose on an NVIDIA H200 (triton 3.6,
#: torch 2.11; OverLoCK-T detection and segmentation maps, batch 1; docs/performance.md): the
#: fastest of ten candidates per kernel by the geometric mean over those eight maps, 1.6-1.7x
#: faster than the first, untuned defaults for forward and grad_value.
#: ``OVERLOCK_TRITON_TILES=/path/tiles.json`` overrides them (same structure, any subset), e.g.
#: with the choice ``tools/analysis/tune_triton.py`` measured on another GPU.
TILES: Dict[str, Dict[str, int]] = {
    'forward': dict(BLOCK_P=128, BLOCK_D=8, num_warps=8),
    'grad_attn': dict(BLOCK_P=32, D_UNROLL=4, num_warps=2),
    'grad_value': dict(BLOCK_P=128, BLOCK_D=8, num_warps=8),
}
TILES_ENV = 'OVERLOCK_TRITON_TILES'

_ACC = {torch.float16: tl.float32, torch.bfloat16: tl.float32, torch.float32: tl.float32,
        torch.float64: tl.float64}


# --------------------------------------------------------------------------------------------
# Kernel bodies. Plain functions, decorated by _jit(): see the module docstring for why.
#
# They use Triton *builtins* only (tl.full, tl.where, tl.minimum, tl.static_range, ...), none of
# the library helpers that triton.language itself defines with @jit (tl.zeros, tl.cdiv, tl.sum,
# tl.max): those are decorated once, when triton.language is imported, so they stay
# compiled-only if TRITON_INTERPRET is set later -- and then the interpreter cannot run a kernel
# calling them.
#
# ``K`` (the kernel size) is a compile-time constant. Each kernel's innermost loop is unrolled
# (``tl.static_range``): its loads are independent of each other, so an unrolled loop has them
# all in flight at once instead of paying one memory latency per iteration.
# The per-(batch, group) base offsets are int64: attn has B*G*k*k*H*W elements, which exceeds
# 2**31 for large batches at k = 13; offsets inside one plane stay int32.
# --------------------------------------------------------------------------------------------

def _fwd_body(attn_ptr, value_ptr, out_ptr, D, H, W, n_pb, K: tl.constexpr,
              BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    R: tl.constexpr = K // 2
    HW = H * W
    pid = tl.program_id(0)
    bg = (pid // n_pb).to(tl.int64)
    pix = (pid % n_pb) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = pix < HW
    i = pix // W
    j = pix % W
    # clamped window start (NATTEN 0.17): shift inward at the borders, never pad
    si = tl.minimum(tl.maximum(i - R, 0), H - K)
    sj = tl.minimum(tl.maximum(j - R, 0), W - K)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m2 = (d < D)[:, None] & pm[None, :]
    a_base = attn_ptr + bg * (K * K) * HW
    v_rows = value_ptr + bg * D * HW + d[:, None] * HW  # [BLOCK_D, 1] channel planes
    acc = tl.full([BLOCK_D, BLOCK_P], 0.0, dtype=ACC)
    for a in range(K):
        src_row = (si + a) * W + sj
        for b in tl.static_range(K):
            w = tl.load(a_base + (a * K + b) * HW + pix, mask=pm, other=0.0).to(ACC)
            v = tl.load(v_rows + (src_row + b)[None, :], mask=m2, other=0.0).to(ACC)
            acc += w[None, :] * v
    o_ptr = out_ptr + bg * D * HW + d[:, None] * HW + pix[None, :]
    tl.store(o_ptr, acc.to(out_ptr.dtype.element_ty), mask=m2)


def _grad_attn_body(grad_out_ptr, value_ptr, grad_attn_ptr, D, H, W, n_pb, K: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, D_UNROLL: tl.constexpr,
                    ACC: tl.constexpr):
    R: tl.constexpr = K // 2
    HW = H * W
    pid = tl.program_id(0)
    bg = (pid // n_pb).to(tl.int64)
    pix = (pid % n_pb) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = pix < HW
    i = pix // W
    j = pix % W
    si = tl.minimum(tl.maximum(i - R, 0), H - K)
    sj = tl.minimum(tl.maximum(j - R, 0), W - K)
    a = tl.program_id(1)  # this program's tap row; its k taps b run along the tile's first axis
    b = tl.arange(0, BLOCK_K)
    m2 = (b < K)[:, None] & pm[None, :]
    nbr = ((si + a) * W + sj)[None, :] + b[:, None]  # [BLOCK_K, BLOCK_P] neighbour offsets
    go_base = grad_out_ptr + bg * D * HW + pix
    v_base = value_ptr + bg * D * HW
    # One accumulator per (tap, pixel), streamed over the channels: no cross-lane reduction, and
    # low-precision outputs are rounded once, after the whole fp32 sum. D_UNROLL channels per
    # step (the last step masked when D_UNROLL does not divide D).
    acc = tl.full([BLOCK_K, BLOCK_P], 0.0, dtype=ACC)
    for d0 in range(0, D, D_UNROLL):
        for dd in tl.static_range(D_UNROLL):
            d = d0 + dd
            dm = d < D
            go = tl.load(go_base + d * HW, mask=pm & dm, other=0.0).to(ACC)
            v = tl.load(v_base + d * HW + nbr, mask=m2 & dm, other=0.0).to(ACC)
            acc += go[None, :] * v
    ga_ptr = grad_attn_ptr + bg * (K * K) * HW + (a * K + b)[:, None] * HW + pix[None, :]
    tl.store(ga_ptr, acc.to(grad_attn_ptr.dtype.element_ty), mask=m2)


def _grad_value_body(attn_ptr, grad_out_ptr, grad_value_ptr, D, H, W, n_pb, K: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    R: tl.constexpr = K // 2
    HW = H * W
    pid = tl.program_id(0)
    bg = (pid // n_pb).to(tl.int64)
    first = (pid % n_pb) * BLOCK_P
    pix = first + tl.arange(0, BLOCK_P)  # *source* pixels (p, q)
    pm = pix < HW
    p = pix // W
    q = pix % W
    # Output rows / columns whose window contains (p, q): one contiguous range per axis
    # (derivation in the module docstring).
    i_lo = tl.where(p < K, 0, p - R)
    i_hi = tl.where(p >= H - K, H - 1, p + R)
    j_lo = tl.where(q < K, 0, q - R)
    j_hi = tl.where(q >= W - K, W - 1, q + R)
    # Trip counts, from scalars (no reduction): exactly k when every pixel of the tile is interior
    # along that axis, otherwise the axis' longest range (shorter ones are masked).
    last = tl.minimum(first + BLOCK_P, HW) - 1
    p0 = first // W
    p1 = last // W
    q0 = first % W
    q1 = last % W
    n_i = tl.where((p0 >= K) & (p1 < H - K), K, tl.where(H < 2 * K, H, K + R))
    n_j = tl.where((p0 == p1) & (q0 >= K) & (q1 < W - K), K, tl.where(W < 2 * K, W, K + R))
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    a_base = attn_ptr + bg * (K * K) * HW
    go_rows = grad_out_ptr + bg * D * HW + d[:, None] * HW
    acc = tl.full([BLOCK_D, BLOCK_P], 0.0, dtype=ACC)
    for u in range(0, n_i):
        i = i_lo + u
        im = pm & (i <= i_hi)
        ta = p - tl.minimum(tl.maximum(i - R, 0), H - K)  # tap row through which i reads p
        # Columns: the first K (every tile has at least K) unrolled, the border tiles' longer
        # ranges in a plain loop. The two bodies are the same; Triton cannot call an undecorated
        # helper, and a decorated one would break the lazy interpreter switch.
        for v in tl.static_range(K):
            j = j_lo + v
            m = im & (j <= j_hi)
            tb = q - tl.minimum(tl.maximum(j - R, 0), W - K)
            o = i * W + j
            w = tl.load(a_base + (ta * K + tb) * HW + o, mask=m, other=0.0).to(ACC)
            g = tl.load(go_rows + o[None, :], mask=dm[:, None] & m[None, :], other=0.0).to(ACC)
            acc += w[None, :] * g
        for v in range(K, n_j):
            j = j_lo + v
            m = im & (j <= j_hi)
            tb = q - tl.minimum(tl.maximum(j - R, 0), W - K)
            o = i * W + j
            w = tl.load(a_base + (ta * K + tb) * HW + o, mask=m, other=0.0).to(ACC)
            g = tl.load(go_rows + o[None, :], mask=dm[:, None] & m[None, :], other=0.0).to(ACC)
            acc += w[None, :] * g
    gv_ptr = grad_value_ptr + bg * D * HW + d[:, None] * HW + pix[None, :]
    tl.store(gv_ptr, acc.to(grad_value_ptr.dtype.element_ty), mask=dm[:, None] & pm[None, :])


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
            if not isinstance(val, int) or isinstance(val, bool) or val < 1 or val & (val - 1):
                raise ValueError(f'{name}.{key} must be a positive power of two, got {val!r}. '
                                 f'{hint}')
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
        if t.dtype not in _ACC:
            raise TypeError(f'na2d triton kernels support {sorted(map(str, _ACC))}, '
                            f'got {t.dtype}.')
    if len({(t.dtype, t.device) for t in tensors}) != 1:
        raise ValueError('na2d triton kernels need all tensors in one dtype on one device.')


def _launch(name: str, args: Tuple[torch.Tensor, ...], value_like: torch.Tensor, k: int) -> None:
    # plain ints: under torch.jit.trace (FLOP counting) sizes are traced 0-d tensors, which
    # Triton's launcher would take for pointers
    b, g, d, h, w = (int(n) for n in value_like.shape)
    tile = tiles(name)
    num_warps = tile.pop('num_warps')
    n_pb = triton.cdiv(h * w, tile['BLOCK_P'])  # pixel tiles per (batch, group) plane
    if name == 'grad_attn':
        # second grid axis: the k tap rows; each program holds all k taps of its row
        grid = (b * g * n_pb, k)
        tile['BLOCK_K'] = triton.next_power_of_2(k)
    else:
        # D rounded up to a power of two (masked), at most BLOCK_D per program
        tile['BLOCK_D'] = min(triton.next_power_of_2(d), tile['BLOCK_D'])
        grid = (b * g * n_pb, triton.cdiv(d, tile['BLOCK_D']))
    kernel = _kernels()[name]
    # Triton launches on the current CUDA device; make it the tensors' one.
    device = value_like.device
    ctx = torch.cuda.device(device) if device.type == 'cuda' else contextlib.nullcontext()
    with ctx:
        kernel[grid](*args, d, h, w, n_pb, K=k, ACC=_ACC[value_like.dtype], num_warps=num_warps,
                     **tile)


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
_TritonNeighborhoodAV = lean_av_function('_TritonNeighborhoodAV', forward, grad_attn, grad_value)


def can_run(device: torch.device) -> bool:
    """CUDA tensors always; CPU tensors only under the interpreter (``TRITON_INTERPRET=1``)."""
    return device.type == 'cuda' or (device.type == 'cpu' and interpreting())


def na2d_av_triton(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``na2d_av`` through the Triton kernels (falls back to ``'native'`` where they cannot run).

    Args:
        attn (Tensor): ``[B, G, k*k, H, W]`` weights.
        value (Tensor): ``[B, G, D, H, W]`` values; ``H, W >= kernel_size``.
        kernel_size (int): odd window size ``k``.

    Returns:
        Tensor: ``[B, G, D, H, W]`` in the autocast dtype under autocast, otherwise in the
        promoted dtype of the inputs (as ``'native'``).
    """
    from .neighborhood import _check_inputs, _compute_dtype, _na2d_av_native
    _check_inputs(attn, value, kernel_size)
    dtype = _compute_dtype(attn, value)
    if attn.device != value.device or not can_run(value.device) or dtype not in _ACC:
        return _na2d_av_native(attn, value, kernel_size)
    # Same casting rule as 'native': autocast decides the dtype, the kernels accumulate in fp32.
    a, v = attn.to(dtype).contiguous(), value.to(dtype).contiguous()
    with torch.autocast(value.device.type, enabled=False):
        return _TritonNeighborhoodAV.apply(a, v, kernel_size)
