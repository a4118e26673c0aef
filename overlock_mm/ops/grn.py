"""Global Response Normalisation (ConvNeXt V2) with a hand-written backward.

For ``x`` with channel axis ``c`` and two spatial axes (``(2, 3)`` for NCHW, ``(1, 2)`` for
NHWC)::

    g = ||x||_2 over the spatial axes          [B, C] (kept as broadcastable dims)
    m = mean_c(g) + eps,  n = g / m,  s = gamma * n + 1
    out = s * x + beta

Autograd of that formula (``torch.norm``, ``*``, ``+``) keeps several map-sized temporaries in
backward: ``grad * s``, ``grad * x`` (reduced afterwards), the norm's ``x * (grad_g / g)`` and
their sum; the forward writes ``s * x`` and then ``+ beta``. Here the forward is one
``addcmul`` and the backward two passes over the map, one map-sized tensor (the result)::

    S = sum_spatial(grad * x)            grad_gamma = sum_b(S * n),  grad_n = S * gamma
    grad_g = grad_n / m - sum_c(grad_n * g) / (C m^2)
    grad_x = grad * s + x * grad_g / g   (the second term 0 where g = 0, as torch's norm backward)
    grad_beta = sum_{b, spatial}(grad)

On the 2-vCPU AMD EPYC VM at OverLoCK-T's largest GRN map (``[1, 256, 200, 336]``, the stage-1
MLP of a 1344x800 detection input) forward+backward ran 2.1x and the forward alone 1.6x faster
than autograd's formula, most of it map-sized allocations avoided (a fresh 69 MB tensor costs
~20 ms of page faults there); ``tools/analysis/benchmark.py --torch-dwconv`` runs the backbone
with the formula (:func:`unfused_grn`) beside the default. Same values up to float32 rounding
(tests/test_ops_grn.py).
"""
import contextlib
from typing import Iterator, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

__all__ = ['grn', 'unfused_grn']

_fused = True


@contextlib.contextmanager
def unfused_grn() -> Iterator[None]:
    """Within the block, :func:`grn` is autograd's formula (the authors' layer as it runs; for
    benchmarks)."""
    global _fused
    previous, _fused = _fused, False
    try:
        yield
    finally:
        _fused = previous


def _axes(x: torch.Tensor, channel_dim: int) -> Tuple[Tuple[int, int], Tuple[int, ...]]:
    """The spatial axes and every axis but the channels'."""
    if x.dim() != 4:
        raise ValueError(f'GRN expects a 4-D tensor, got shape {tuple(x.shape)}')
    c = channel_dim % 4
    spatial = tuple(a for a in (1, 2, 3) if a != c)
    return spatial, (0,) + spatial


def _scale(x: torch.Tensor, gamma: torch.Tensor, spatial: Tuple[int, int], channel_dim: int,
           eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(g, m, s)`` of the module docstring, each broadcastable against ``x``."""
    g = torch.norm(x, p=2, dim=spatial, keepdim=True)
    m = g.mean(dim=channel_dim, keepdim=True) + eps
    return g, m, torch.addcmul(torch.ones_like(g), gamma, g / m)


def _affine(x: torch.Tensor, s: torch.Tensor, beta: Optional[torch.Tensor]) -> torch.Tensor:
    """``s * x + beta`` in one pass."""
    return s * x if beta is None else torch.addcmul(beta, x, s)


class _GRN(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, gamma, beta, channel_dim, eps):
        spatial, _ = _axes(x, channel_dim)
        g, m, s = _scale(x, gamma, spatial, channel_dim, eps)
        out = _affine(x, s, beta)
        ctx.save_for_backward(x, gamma, g, m, s)
        ctx.channel_dim, ctx.has_beta = channel_dim, beta is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, gamma, g, m, s = ctx.saved_tensors
        spatial, not_channels = _axes(x, ctx.channel_dim)
        # the one map-sized tensor: grad * x first (for its sum), then overwritten by grad_x
        grad_x = torch.mul(grad, x)
        gs = grad_x.sum(dim=spatial, keepdim=True)
        grad_gamma = (gs * (g / m)).sum(dim=0, keepdim=True) if ctx.needs_input_grad[1] else None
        grad_beta = (grad.sum(dim=not_channels, keepdim=True)
                     if ctx.has_beta and ctx.needs_input_grad[2] else None)
        if not ctx.needs_input_grad[0]:
            return None, grad_gamma, grad_beta, None, None
        gn = gs * gamma
        c = x.shape[ctx.channel_dim]
        grad_g = gn / m - (gn * g).sum(dim=ctx.channel_dim, keepdim=True) / (c * m * m)
        coef = torch.where(g > 0, grad_g / g, torch.zeros_like(g))
        torch.mul(grad, s, out=grad_x)
        grad_x.addcmul_(x, coef)
        return grad_x, grad_gamma, grad_beta, None, None


def grn(x: torch.Tensor, gamma: torch.Tensor, beta: Optional[torch.Tensor] = None,
        channel_dim: int = 1, eps: float = 1e-6) -> torch.Tensor:
    """``(gamma * n + 1) * x + beta`` with ``n`` the spatial L2 norm of ``x`` over its channel
    mean (module docstring).

    Args:
        x (Tensor): a 4-D map, channels on ``channel_dim`` (1: NCHW, 3 or -1: NHWC).
        gamma (Tensor): shaped like ``x``'s per-channel statistics, e.g. ``[1, C, 1, 1]``.
        beta (Tensor, optional): same shape as ``gamma``; None adds nothing.
        channel_dim (int): the channel axis. Defaults to 1.
        eps (float): added to the channel mean of the norms. Defaults to 1e-6.
    """
    spatial, _ = _axes(x, channel_dim)
    if not _fused or torch.jit.is_tracing():
        # the formula itself (and a plain aten graph for tracers, e.g. FLOP counting)
        g = torch.norm(x, p=2, dim=spatial, keepdim=True)
        out = (gamma * (g / (g.mean(dim=channel_dim, keepdim=True) + eps)) + 1) * x
        return out if beta is None else out + beta
    params = (gamma,) if beta is None else (gamma, beta)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return _GRN.apply(x, gamma, beta, channel_dim, eps)
    return _affine(x, _scale(x, gamma, spatial, channel_dim, eps)[2], beta)
