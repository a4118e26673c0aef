"""ContMix aggregation op vs an independent brute-force NATTEN-0.17 reference.

The reference below is written from the semantics in docs/spec/ARCHITECTURE.md with explicit
Python loops (one output pixel at a time), in NATTEN's own [B, G, H, W, taps] layout, so it
shares no code or layout with the implementation under test.

Every implementation gets the weights in both layouts the op accepts (``LAYOUTS``): contiguous
``[B, G, k*k, H, W]`` and pixel-major (a permuted view of NATTEN's layout), which the ``'cpu'``
kernel reads with code paths of its own.
"""
from functools import lru_cache

import pytest
import torch

from overlock_mm.ops import (available_impls, is_pixel_major, na2d_av, na2d_cpu,
                             prefers_pixel_major)

IMPLS = available_impls()
LAYOUTS = ('contiguous', 'pixel-major')


def clamped_windows(H: int, W: int, k: int):
    """(i, j, si, sj) for every pixel: its k x k window starts at (si, sj), clamped to the map."""
    r = k // 2
    for i in range(H):
        si = min(max(i - r, 0), H - k)
        for j in range(W):
            yield i, j, si, min(max(j - r, 0), W - k)


def brute_force_av(attn_nat: torch.Tensor, v_nat: torch.Tensor, k: int) -> torch.Tensor:
    """attn [B, G, H, W, k*k], v [B, G, H, W, D] -> [B, G, H, W, D] (NATTEN layout)."""
    B, G, H, W, D = v_nat.shape
    out = torch.zeros_like(v_nat)
    for i, j, si, sj in clamped_windows(H, W, k):
        window = v_nat[:, :, si:si + k, sj:sj + k, :].reshape(B, G, k * k, D)
        out[:, :, i, j] = (attn_nat[:, :, i, j, :, None] * window).sum(2)
    return out


def to_ours(attn_nat, v_nat, layout='pixel-major'):
    """Our [B, G, k*k, H, W] / [B, G, D, H, W] views; ``attn`` contiguous or pixel-major."""
    attn = attn_nat.permute(0, 1, 4, 2, 3)
    if layout == 'contiguous':
        attn = attn.contiguous()
    assert is_pixel_major(attn) == (layout == 'pixel-major' and attn_nat.shape[-1] > 1)
    return attn, v_nat.permute(0, 1, 4, 2, 3)


def leaf(t):
    """``t`` as a leaf that requires grad, strides unchanged."""
    return t.detach().requires_grad_()


def from_ours(out):
    return out.permute(0, 1, 3, 4, 2)


# Border-heavy sizes: H or W equal to k, k + 1, non-square; kernels of the real model included.
CASES = [
    (3, 3, 3), (3, 4, 5), (5, 5, 6), (5, 6, 5), (7, 7, 9), (7, 8, 7), (5, 11, 6), (13, 13, 14),
    (13, 14, 20), (1, 3, 4),
    # wide rows: the CPU kernels work in blocks / tiles of up to 16 pixels of a row, border
    # blocks (clamped windows) and interior blocks differ, so rows much wider than 2r + 16 are
    # covered
    (3, 5, 41), (7, 9, 45), (13, 15, 61),
]


def make(B, G, D, H, W, k, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    attn = torch.randn(B, G, H, W, k * k, generator=g, dtype=dtype).softmax(-1)
    v = torch.randn(B, G, H, W, D, generator=g, dtype=dtype)
    return attn, v


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('k,H,W', CASES)
def test_forward_matches_brute_force(impl, k, H, W, layout):
    attn, v = make(2, 3, 4, H, W, k)
    expected = brute_force_av(attn, v, k)
    out = from_ours(na2d_av(*to_ours(attn, v, layout), k, impl=impl))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('k,H,W,D', [(7, 15, 17, 8), (13, 16, 70, 24)])
def test_forward_float32_tolerance(impl, k, H, W, D, layout):
    attn, v = make(1, 2, D, H, W, k, dtype=torch.float32)
    expected = brute_force_av(attn.double(), v.double(), k)
    out = from_ours(na2d_av(*to_ours(attn, v, layout), k, impl=impl))
    assert (out.double() - expected).abs().max() < 1e-5


# The CPU forward has a compiled block kernel per k in (3, 5, 7, 9, 11, 13), block position (row
# start, interior, row end) and block width (16 or 14 pixels with AVX-512, whichever computes
# fewer pixels for the row), used where W >= 16 + k // 2 or so, and a generic path otherwise.
# Per k: the narrowest map of the compiled path (14-pixel blocks), one whose last interior block
# is shifted left (16-pixel blocks), and the detection stage-3 width (6 x 14); channel counts
# below, at and above one vector (zero-padded channel vectors).  (3, 113): 14-pixel blocks whose
# last interior block ends one pixel before the row does (its whole-vector store must not spill
# past the row).
BLOCK_CASES = [(k, w, d) for k in (3, 5, 7, 9, 11, 13)
               for w, d in ((16 + k // 2, 16), (45, 10), (84, 24))] + [(13, 21, 16), (15, 40, 16),
                                                                       (3, 113, 16)]
# Maps too narrow for those widths, where the forward uses blocks of 8 or 4 pixels (the
# classification maps: 14x14 at k = 13 is two 8-pixel blocks, 7x7 at k = 5 / 7 two 4-pixel ones;
# (7, 10) and (9, 17) have interior blocks too).  (13, 18) would need 4-pixel interior blocks,
# which cannot reach the clamped pixels 4 and 5 from the border block [0, 4): it must stay on
# the generic path (it failed before blocks_fit asked for P >= r).  Channel counts below, at and
# above one vector.
NARROW_CASES = [(3, 10, 16), (5, 7, 16), (5, 8, 10), (5, 14, 24), (7, 7, 16), (7, 10, 10),
                (7, 12, 24), (9, 13, 16), (9, 17, 10), (11, 14, 10), (13, 14, 16), (13, 16, 24),
                (13, 18, 10)]


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('impl', [i for i in IMPLS if i == 'cpu'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('k,W,D', BLOCK_CASES + NARROW_CASES)
def test_forward_block_kernels(impl, dtype, k, W, D, layout):
    H = k + 3
    attn, v = make(1, 2, D, H, W, k, dtype=dtype, seed=k + W)
    expected = brute_force_av(attn.double(), v.double(), k)
    with torch.no_grad():
        out = from_ours(na2d_av(*to_ours(attn, v, layout), k, impl=impl))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert (out.double() - expected).abs().max() < tol


def brute_force_grad_value(attn_nat, g_nat, k):
    """d(sum(out * g)) / d(value) by scattering every pixel's weighted ``g`` into its window:
    [B, G, H, W, k*k], [B, G, H, W, D] -> [B, G, H, W, D] (NATTEN layout)."""
    B, G, H, W, D = g_nat.shape
    grad = torch.zeros_like(g_nat)
    for i, j, si, sj in clamped_windows(H, W, k):
        taps = attn_nat[:, :, i, j].reshape(B, G, k, k, 1)
        grad[:, :, si:si + k, sj:sj + k] += taps * g_nat[:, :, i, j, None, None, :]
    return grad


# grad_value of pixel-major weights has compiled block kernels of its own (k in 3..13, blocks of
# 16 or 14 source columns where W >= 14, else 8 or 4; the row's last block overlaps the one
# before, the blocks at both ends skip border pixels, whose clamped windows are summed apart):
# the same widths, channel counts and dtypes as the forward's block cases, both layouts.
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('impl', [i for i in IMPLS if i == 'cpu'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('k,W,D', BLOCK_CASES + NARROW_CASES + [(5, 16, 33), (3, 3, 16),
                                                                (5, 5, 10), (9, 9, 16),
                                                                (11, 12, 16), (13, 13, 24)])
def test_grad_value_block_kernels(impl, dtype, k, W, D, layout):
    H = k + 3
    attn, v = make(1, 2, D, H, W, k, dtype=dtype, seed=k + W)
    g = torch.randn(1, 2, H, W, D, generator=torch.Generator().manual_seed(W), dtype=dtype)
    expected = brute_force_grad_value(attn.double(), g.double(), k)
    a2, v2 = to_ours(attn, v, layout)
    v2 = leaf(v2.contiguous())
    (from_ours(na2d_av(a2, v2, k, impl=impl)) * g).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert (v2.grad.permute(0, 1, 3, 4, 2).double() - expected).abs().max() < tol


# The block kernels read the taps straight from `attn` unless the plane stride (H * W elements)
# puts more than 4 of a window row's taps into one L1 set (it repeats every 4 KB); then from a
# packed copy per block.  The cases above read directly; maps whose plane is a multiple of 4 KB
# take the copy at every compiled k > 4 (k = 3 never does): 16 x 64 with 16-pixel blocks,
# 128 x 56 with 14-pixel blocks, 64 x 16 with 8-pixel blocks from k = 7 (the copy's 16-wide
# loads then start left of the row's second block), in both dtypes.  128 x 8 is narrower than
# the copy's 16-wide loads, which would start before the first row (out of bounds, though the
# values would come out right): there the forward takes the generic path, or with 8-lane vectors
# 4-pixel blocks.  (Contiguous weights only: pixel-major ones are always read in place.)
PACKED_CASES = [(k, h, w) for k in (5, 7, 9, 11, 13) for h, w in ((16, 64), (128, 56), (64, 16))
                ] + [(5, 128, 8), (7, 128, 8)]


@pytest.mark.parametrize('impl', [i for i in IMPLS if i == 'cpu'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('k,H,W', PACKED_CASES)
def test_forward_block_kernels_packed_taps(impl, dtype, k, H, W):
    attn, v = make(1, 2, 16, H, W, k, dtype=dtype, seed=k)
    expected = brute_force_av(attn.double(), v.double(), k)
    with torch.no_grad():
        out = from_ours(na2d_av(*to_ours(attn, v, 'contiguous'), k, impl=impl))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert (out.double() - expected).abs().max() < tol


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('k,H,W,D', [(5, 7, 9, 8), (7, 9, 12, 16), (13, 15, 40, 16),
                                     (13, 14, 20, 24)])
def test_float32_gradients(impl, k, H, W, D, layout):
    # float32 has twice float64's SIMD lanes: rows narrower than a vector (9, 12 < 16), rows of
    # one border-only tile and wide rows take different kernel paths than in float64
    attn, v = make(1, 2, D, H, W, k, dtype=torch.float32, seed=3)
    g = torch.randn(1, 2, H, W, D, generator=torch.Generator().manual_seed(4))
    a1, v1 = attn.double().requires_grad_(), v.double().requires_grad_()
    (brute_force_av(a1, v1, k) * g.double()).sum().backward()
    a2, v2 = (leaf(t) for t in to_ours(attn, v, layout))
    out = from_ours(na2d_av(a2, v2, k, impl=impl))
    (out * g).sum().backward()
    check_grad_layout(impl, a2)
    assert (out.double() - brute_force_av(attn.double(), v.double(), k)).abs().max() < 1e-5
    assert (a2.grad.permute(0, 1, 3, 4, 2).double() - a1.grad).abs().max() < 1e-4
    assert (v2.grad.permute(0, 1, 3, 4, 2).double() - v1.grad).abs().max() < 1e-4


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('k,H,W', [(3, 3, 4), (3, 5, 3), (5, 5, 6), (5, 7, 9), (7, 8, 7)])
def test_gradcheck_float64(impl, k, H, W, layout):
    attn, v = make(1, 2, 3, H, W, k)
    a, vv = to_ours(attn, v, layout)
    a = leaf(a)
    vv = vv.contiguous().requires_grad_()
    # fast_mode checks random projections of the Jacobian (the full Jacobian has k*k*H*W columns);
    # test_gradients_match_brute_force compares full gradients.
    assert torch.autograd.gradcheck(lambda x, y: na2d_av(x, y, k, impl=impl), (a, vv),
                                    eps=1e-6, atol=1e-7, fast_mode=True)


GRAD_CASES = [(3, 3, 5, 5), (5, 6, 5, 5), (7, 7, 10, 5), (3, 4, 37, 3), (7, 8, 45, 20),
              (13, 14, 36, 17),
              # float64 vectors hold 8 values: k = 19 has more taps and more border pixels
              # (r = 9) than a vector holds, so the CPU kernel's border blocks split both ways
              (19, 20, 22, 3)]


@lru_cache(maxsize=None)
def brute_force_grads(k, H, W, D):
    """(inputs, upstream gradient, brute-force gradients), computed once per case."""
    attn, v = make(2, 2, D, H, W, k, seed=1)
    g = torch.randn(2, 2, H, W, D, dtype=torch.float64)
    a1, v1 = attn.clone().requires_grad_(), v.clone().requires_grad_()
    (brute_force_av(a1, v1, k) * g).sum().backward()
    return attn, v, g, a1.grad, v1.grad


def check_grad_layout(impl, attn):
    """The 'cpu' kernel returns grad_attn in the weights' layout (what the softmax before it
    reads); the others return it contiguous."""
    pixels = is_pixel_major(attn)
    if impl == 'cpu' and pixels:
        assert is_pixel_major(attn.grad)
    elif not pixels:
        assert attn.grad.is_contiguous()


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('k,H,W,D', GRAD_CASES)
def test_gradients_match_brute_force(impl, k, H, W, D, layout):
    attn, v, g, grad_attn, grad_v = brute_force_grads(k, H, W, D)
    a2, v2 = to_ours(attn, v, layout)
    a2 = leaf(a2)
    v2 = v2.contiguous().requires_grad_()
    (from_ours(na2d_av(a2, v2, k, impl=impl)) * g).sum().backward()
    check_grad_layout(impl, a2)
    torch.testing.assert_close(a2.grad.permute(0, 1, 3, 4, 2), grad_attn)
    torch.testing.assert_close(v2.grad.permute(0, 1, 3, 4, 2), grad_v)


def brute_force_grad_attn(g_nat, v_nat, k):
    """d(sum(out * g)) / d(attn): every pixel's window of ``v`` dotted with its ``g``:
    [B, G, H, W, D] twice -> [B, G, H, W, k*k] (NATTEN layout)."""
    B, G, H, W, D = v_nat.shape
    grad = torch.zeros(B, G, H, W, k * k, dtype=v_nat.dtype)
    for i, j, si, sj in clamped_windows(H, W, k):
        window = v_nat[:, :, si:si + k, sj:sj + k, :].reshape(B, G, k * k, D)
        grad[:, :, i, j] = (window * g_nat[:, :, i, j, None, :]).sum(-1)
    return grad


# grad_attn of pixel-major weights has two kernels: tiles of pixels (tap-major, then transposed)
# and, where k >= 9 or rows are narrow, one vector per tap row of a pixel, two rows at a time
# (GattnPm; 2k * ceil(W / lanes) > W).  Cases on both sides of that rule in both dtypes (float64
# vectors hold 8 values, so there only k <= 7 takes GattnPm): odd H (a last single row), H = k
# (every row clamped: row pairs share their window), channel counts below and above a vector.
GATTN_CASES = [(3, 5, 6, 16), (5, 7, 7, 16), (5, 9, 8, 10), (7, 7, 7, 24), (7, 13, 12, 16),
               (9, 13, 30, 16), (11, 12, 20, 10), (13, 13, 14, 16), (13, 17, 40, 24),
               (5, 14, 14, 16), (7, 9, 42, 16), (5, 6, 33, 10)]


@pytest.mark.parametrize('impl', [i for i in IMPLS if i == 'cpu'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('k,H,W,D', GATTN_CASES)
def test_grad_attn_pixel_major_kernels(impl, dtype, k, H, W, D):
    attn, v = make(2, 2, D, H, W, k, dtype=dtype, seed=k * W)
    g = torch.randn(2, 2, H, W, D, generator=torch.Generator().manual_seed(H), dtype=dtype)
    expected = brute_force_grad_attn(g.double(), v.double(), k)
    a2, v2 = to_ours(attn, v, 'pixel-major')
    a2 = leaf(a2)
    (from_ours(na2d_av(a2, v2.contiguous(), k, impl=impl)) * g).sum().backward()
    assert is_pixel_major(a2.grad)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert (a2.grad.permute(0, 1, 3, 4, 2).double() - expected).abs().max() < tol


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast(impl, dtype, layout):
    attn, v = make(1, 2, 8, 9, 11, 5, dtype=torch.float32)
    expected = brute_force_av(attn.double(), v.double(), 5)
    a, vv = to_ours(attn, v, layout)
    a = leaf(a)
    vv = vv.contiguous().requires_grad_()
    with torch.autocast('cpu', dtype=dtype):
        out = na2d_av(a, vv, 5, impl=impl)
    assert out.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert (from_ours(out).double() - expected).abs().max() < tol
    out.float().sum().backward()
    assert a.grad is not None and a.grad.dtype == torch.float32 and torch.isfinite(a.grad).all()
    assert vv.grad is not None and vv.grad.dtype == torch.float32


@pytest.mark.skipif('cpu' not in IMPLS, reason="no 'cpu' kernel")
def test_cpu_raw_kernels_take_any_strides():
    """The raw kernel calls (what a torch.compile graph runs) read contiguous and pixel-major
    weights in place and copy any other layout first -- never misread it."""
    k = 5
    attn, v = make(1, 2, 4, 7, 9, k)
    expected = brute_force_av(attn, v, k)
    value = v.permute(0, 1, 4, 2, 3).contiguous()
    grad_out = torch.randn_like(value)
    odd = attn.transpose(2, 3).contiguous().transpose(2, 3).permute(0, 1, 4, 2, 3)  # W before H
    assert not odd.is_contiguous() and not is_pixel_major(odd)
    grads = []
    for a in to_ours(attn, v, 'contiguous')[0], to_ours(attn, v, 'pixel-major')[0], odd:
        torch.testing.assert_close(from_ours(na2d_cpu.forward(a, value, k)), expected)
        grads.append(na2d_cpu.grad_value(grad_out, a, k))
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0])


def test_prefers_pixel_major():
    """Only the 'cpu' kernel asks for pixel-major weights, and only on the CPU (where 'auto'
    picks it)."""
    assert not prefers_pixel_major('reference', 'cpu')
    assert not prefers_pixel_major('native', 'cpu')
    assert not prefers_pixel_major('auto', 'cuda')
    assert prefers_pixel_major('cpu', 'cpu') == ('cpu' in IMPLS and na2d_cpu.is_available())
    assert prefers_pixel_major('auto', 'cpu') == ('cpu' in IMPLS and na2d_cpu.is_available())


def test_prefers_pixel_major_without_the_kernel_library(monkeypatch):
    """Where the C++ library did not build, 'cpu' runs 'native', which reads contiguous weights
    faster: ContMix is then not asked for pixel-major ones."""
    monkeypatch.setattr(na2d_cpu, 'is_available', lambda: False)
    assert not prefers_pixel_major('cpu', 'cpu')
    assert not prefers_pixel_major('auto', 'cpu')


def test_saved_for_backward_is_lean():
    """The fast path must not keep a [B, G, D, k*k, H, W] neighbourhood alive for backward."""
    k, B, G, D, H, W = 7, 1, 2, 8, 16, 16
    attn, v = make(B, G, D, H, W, k, dtype=torch.float32)
    a, vv = to_ours(attn, v)
    a = a.contiguous().requires_grad_()
    vv = vv.contiguous().requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    for impl, lean in (('auto', True), ('reference', False)):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            na2d_av(a, vv, k, impl=impl)
        budget = a.numel() + vv.numel()
        if lean:
            assert sum(saved) <= budget, (impl, saved)
        else:  # the reference formulation really is the memory hog this guards against
            assert max(saved) >= B * G * D * k * k * H * W


def test_bad_inputs():
    attn, v = make(1, 2, 3, 7, 7, 3)
    a, vv = to_ours(attn, v)
    with pytest.raises(ValueError, match='taps'):
        na2d_av(a, vv, 5)
    with pytest.raises(ValueError, match='odd'):
        na2d_av(a, vv, 4)
    with pytest.raises(ValueError, match='smaller than kernel_size'):
        a9, v9 = to_ours(*make(1, 2, 3, 7, 7, 9))
        na2d_av(a9, v9, 9)
    with pytest.raises(ValueError, match='disagree'):
        na2d_av(a, vv[:, :1], 3)
    with pytest.raises(ValueError, match="unknown na2d_av impl 'cuda_magic'"):
        na2d_av(a, vv, 3, impl='cuda_magic')
