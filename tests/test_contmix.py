"""ContMix's kernel generation writes the same kernels in both layouts the aggregation accepts.

``contmix_kernels(..., pixel_major=True)`` (what the backbone does where the aggregation reads
pixel-major weights fastest, the CPU kernel) must give the values, and through the aggregation
the gradients, of the contiguous layout (the backbone's other path, which the parity tests pin to
the released weights' outputs with the reference op).
"""
import pytest
import torch
import torch.nn as nn

from overlock_mm.layers.contmix import contmix_kernels, relative_position_bias
from overlock_mm.ops import is_pixel_major, na2d_av, relative_position_index


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    b, groups, h, w, s, k = 2, 4, 9, 14, 3, 7
    affinity = torch.randn(b, groups, h * w, 49, generator=g, dtype=torch.float64)
    proj = nn.Conv2d(49, s * s + k * k, 1).double()
    with torch.no_grad():
        proj.weight.copy_(torch.randn(proj.weight.shape, generator=g))
        proj.bias.copy_(torch.randn(proj.bias.shape, generator=g))
    rpb_s = torch.randn(groups, 2 * s - 1, 2 * s - 1, generator=g, dtype=torch.float64)
    rpb_l = torch.randn(groups, 2 * k - 1, 2 * k - 1, generator=g, dtype=torch.float64)
    value = torch.randn(b, groups, 5, h, w, generator=g, dtype=torch.float64)
    return affinity, proj, rpb_s, rpb_l, h, w, s, k, value


def test_relative_position_bias_layouts_agree():
    rpb = torch.randn(3, 9, 9, dtype=torch.float64)
    taps_first = relative_position_bias(rpb, 6, 11)
    pixels_first = relative_position_bias(rpb, 6, 11, pixel_major=True)
    assert taps_first.shape == (3, 25, 6, 11) and pixels_first.shape == (3, 6, 11, 25)
    torch.testing.assert_close(pixels_first.permute(0, 3, 1, 2), taps_first, rtol=0, atol=0)


@pytest.mark.parametrize('h,w,k', [(6, 11, 5), (7, 7, 7), (9, 16, 3)])
def test_relative_position_bias_brute_force(h, w, k):
    """Each tap's bias read from the table by NATTEN's rule, pixel by pixel: the pixel-major
    layout builds it from per-(window offset) rows, the tap-major one from per-position rows."""
    rpb = torch.randn(2, 2 * k - 1, 2 * k - 1, dtype=torch.float64)
    ri, rj = relative_position_index(h, k), relative_position_index(w, k)
    expected = torch.empty(2, h, w, k, k, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            for a in range(k):
                for b in range(k):
                    expected[:, i, j, a, b] = rpb[:, ri[i, a], rj[j, b]]
    expected = expected.view(2, h, w, k * k)
    torch.testing.assert_close(relative_position_bias(rpb, h, w, pixel_major=True), expected,
                               rtol=0, atol=0)
    torch.testing.assert_close(relative_position_bias(rpb, h, w), expected.permute(0, 3, 1, 2),
                               rtol=0, atol=0)


@pytest.mark.parametrize('impl', ['native', 'auto'])
def test_kernels_and_gradients_agree_across_layouts(impl):
    affinity, proj, rpb_s, rpb_l, h, w, s, k, value = _inputs()
    results = []
    for pixel_major in (False, True):
        leaves = [t.clone().requires_grad_() for t in (affinity, rpb_s, rpb_l)]
        proj.zero_grad()
        small, large = contmix_kernels(leaves[0], proj, leaves[1], leaves[2], h, w, pixel_major)
        assert small.shape == (2, 4, s * s, h, w) and large.shape == (2, 4, k * k, h, w)
        assert is_pixel_major(large) == pixel_major
        torch.testing.assert_close(large.sum(2), torch.ones(2, 4, h, w, dtype=torch.float64))
        out = na2d_av(small, value, s, impl=impl) + 2 * na2d_av(large, value, k, impl=impl)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append(([small.detach(), large.detach()],
                        [t.grad for t in leaves] + [proj.weight.grad.clone(),
                                                    proj.bias.grad.clone()]))
    (kernels_a, grads_a), (kernels_b, grads_b) = results
    for x, y in zip(kernels_a + grads_a, kernels_b + grads_b):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
