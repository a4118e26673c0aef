"""ContMix: context-mixing dynamic kernels (OverLoCK, CVPR 2025, Sec. 3.3).

Each pixel gets two dynamic depthwise kernels (a small ``s x s`` and a large ``K x K`` one) whose
taps are softmax weights derived from the pixel's affinity to 7x7 pooled regions of the context
prior. This file holds the kernel *generation* (affinity -> taps -> softmax with relative position
bias) and calls the aggregation op (:mod:`overlock_mm.ops`). Change the kernel here.
"""
from functools import lru_cache
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import na2d_av, relative_position_index

#: the context is pooled to this many regions per side (``weight_key``'s AdaptiveAvgPool).
NUM_REGIONS_SIDE = 7


@lru_cache(maxsize=64)
def _rpb_index(h: int, w: int, k: int, device: torch.device) -> Tuple[torch.Tensor, ...]:
    """``(ri [H, k], rj [W, k], offsets [k * k], pixels [H * W])``: the rpb index of every
    position and tap; ``u + a`` for window offset ``u`` and tap ``a``, both in ``[0, k)``; and
    each pixel's pair of window offsets ``p(i) * k + p(j)`` (``p = ri[:, 0]``)."""
    ri, rj = relative_position_index(h, k, device), relative_position_index(w, k, device)
    u = torch.arange(k, device=device)
    offsets = (u[:, None] + u[None, :]).reshape(-1)
    pixels = (ri[:, :1] * k + rj[None, :, 0]).reshape(-1)
    return ri, rj, offsets, pixels


def relative_position_bias(rpb: torch.Tensor, h: int, w: int,
                           pixel_major: bool = False) -> torch.Tensor:
    """Expand a ``[G, 2k-1, 2k-1]`` table into per-pixel tap biases ``[G, k*k, H, W]``
    (``[G, H, W, k*k]`` if ``pixel_major``).

    Tap ``(a, b)`` of pixel ``(i, j)`` reads ``rpb[g, p(i) + a, p(j) + b]`` (NATTEN 0.17).
    """
    g, k = rpb.shape[0], (rpb.shape[-1] + 1) // 2
    # a torch.compile trace computes the index itself (it becomes graph constants); through the
    # cache it would warn that it ignores the cache
    index = _rpb_index.__wrapped__ if torch.compiler.is_compiling() else _rpb_index
    ri, rj, offsets, pixels = index(h, w, k, rpb.device)
    # index_selects only: an advanced-indexing gather's backward is an accumulating index_put,
    # which ran 25 ms per call on CPU at detection size; index_select's is index_add.
    if pixel_major:
        # The window offset p(i) takes only k values (r in the interior, others at the borders),
        # so there are k * k distinct per-pixel biases: build those [G, (p(i), p(j)), T] (small),
        # then pick one row per pixel -- the output in its final layout, one contiguous row of
        # k * k taps per pixel. On CPU at k = 13, 50x84, 8 groups: 2.1-2.4 against 10-17 ms
        # forward, 5.3-5.8 against 20-28 ms with backward, for the per-pixel rows-then-columns
        # gather (below) and its permuted copy.
        table = rpb.index_select(1, offsets).index_select(2, offsets)  # [G, (u, a), (v, b)]
        table = table.view(g, k, k, k, k).permute(0, 1, 3, 2, 4).reshape(g, k * k, k * k)
        return table.index_select(1, pixels).view(g, h, w, k * k)
    # Rows, then columns, indices ordered (tap, position), then taps moved in front (a copy;
    # cheap on a GPU, which reads this layout).
    rows = rpb.index_select(1, ri.t().reshape(-1))  # [G, k(a) * H, 2k-1]
    bias = rows.index_select(2, rj.t().reshape(-1))  # [G, k(a) * H, k(b) * W]
    return bias.view(g, k, h, k, w).permute(0, 1, 3, 2, 4).reshape(g, k * k, h, w)


def contmix_kernels(affinity: torch.Tensor, proj: nn.Conv2d, rpb_small: torch.Tensor,
                    rpb_large: torch.Tensor, h: int, w: int,
                    pixel_major: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Turn pixel-to-region affinities into the two softmax-normalised dynamic kernels.

    Args:
        affinity: ``[B, G, H*W, 49]`` scaled query-key products.
        proj: the ``weight_proj`` 1x1 conv mapping 49 regions to ``s*s + K*K`` taps.
        rpb_small, rpb_large: relative position bias tables ``[G, 2s-1, 2s-1]``,
            ``[G, 2K-1, 2K-1]``.
        h, w: the map's size (``H * W`` pixels).
        pixel_major: write the kernels with each pixel's taps consecutive
            (:func:`overlock_mm.ops.is_pixel_major`), for an aggregation that reads them fastest
            so (:func:`overlock_mm.ops.prefers_pixel_major`); same values, same shapes.

    Returns:
        ``([B, G, s*s, H, W], [B, G, K*K, H, W])`` kernels, each summing to one over taps.
    """
    b, g, n, _ = affinity.shape
    taps = proj.out_channels
    s2 = rpb_small.shape[-1] // 2 + 1
    weight = proj.weight.view(taps, -1).to(affinity.dtype)
    if pixel_major:  # the 1x1 conv as a linear map on the last axis: [B, G, HW, 49] -> [.., T]
        logits = F.linear(affinity, weight, proj.bias.to(affinity.dtype)).view(b, g, h, w, taps)
    else:  # the 1x1 conv across the 49 region channels, as a matmul: [T, 49] @ [B, G, 49, HW]
        logits = torch.matmul(weight, affinity.transpose(-1, -2))
        logits = (logits + proj.bias.view(taps, 1).to(logits.dtype)).view(b, g, taps, h, w)
    dim = -1 if pixel_major else 2  # the taps' axis
    small, large = logits.split([s2 * s2, taps - s2 * s2], dim=dim)
    # The biases get a leading batch axis of 1: the add's backward then reduces the gradient to
    # [1, ...] (keepdim), not to the bias's own shape, which on CPU zero-fills and sums in a
    # slower kernel (k = 13, 50x84, 8 groups, forward+backward of add+softmax: 12.7 against
    # 25.8 ms at batch 1, 42 against 67 ms at batch 2).
    small = (small + relative_position_bias(rpb_small, h, w, pixel_major)[None]).softmax(dim=dim)
    large = (large + relative_position_bias(rpb_large, h, w, pixel_major)[None]).softmax(dim=dim)
    if pixel_major:
        return small.permute(0, 1, 4, 2, 3), large.permute(0, 1, 4, 2, 3)
    return small, large


def contmix_aggregate(value: torch.Tensor, small: torch.Tensor, large: torch.Tensor,
                      kernel_sizes: Tuple[int, int], impl: str = 'auto') -> torch.Tensor:
    """Apply the two kernels to ``value`` ``[B, C, H, W]``.

    The first C/2 channels (``m = 0``) are aggregated with the small kernel and the rest with the
    large one, ``G`` heads each, channel order ``(m, G, C / 2G)``. ``kernel_sizes`` are
    ``(s, K)``: given, not read back from the taps' shapes, so that a ``torch.compile`` trace
    (where shapes may be symbolic) and a jit trace (0-d tensors) see plain ints.
    """
    b, c, h, w = value.shape
    g = small.shape[1]
    v = value.view(b, 2, g, c // (2 * g), h, w)
    ks, kl = kernel_sizes
    out_s = na2d_av(small, v[:, 0], ks, impl=impl)
    out_l = na2d_av(large, v[:, 1], kl, impl=impl)
    return torch.cat([out_s, out_l], dim=1).view(b, c, h, w)
