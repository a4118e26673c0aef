"""Normalisation and scaling layers of OverLoCK (docs/spec/ARCHITECTURE.md, "Building blocks")."""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.batchnorm import batch_norm_train, fast_path_applies
from ..ops.grn import grn


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same arguments, parameters, buffers and checkpoint keys) whose
    training forward runs our CPU kernel where :func:`~overlock_mm.ops.batchnorm.
    fast_path_applies` (:mod:`overlock_mm.ops.batchnorm`); everything else is
    ``nn.BatchNorm2d``'s own forward. The running statistics are updated as there:
    ``num_batches_tracked`` counts (when the buffer is not None), the factor is ``momentum`` or,
    for ``momentum=None``, ``1 / num_batches_tracked``, and the variance averaged in is the
    unbiased one. SyncBatchNorm conversion and re-parameterisation see a ``_BatchNorm``."""

    #: like ``_BatchNorm.forward``, ours leaves the count alone when ``num_batches_tracked`` is
    #: None (what :mod:`overlock_mm.utils.activation_checkpoint` relies on to freeze it cheaply)
    skips_count_without_buffer = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and fast_path_applies(x)):
            return super().forward(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        out, mean, var = batch_norm_train(x, self.weight, self.bias, self.eps)
        # factor 0 (momentum 0: the statistics frozen during a recomputation) changes nothing
        if self.track_running_stats and self.running_mean is not None and factor != 0:
            n = x.numel() // x.shape[1]
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
                self.running_var.mul_(1 - factor).add_(var, alpha=factor * n / (n - 1))
        return out


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (eps 1e-6, as released)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalisation (ConvNeXt V2) on NCHW tensors.

    ``g = ||x||_2`` over (H, W) per channel, ``n = g / (mean_c(g) + 1e-6)``,
    ``out = (gamma * n + 1) * x + beta``; ``gamma`` and ``beta`` start at zero. Computed by
    :func:`overlock_mm.ops.grn.grn` (a leaner backward than autograd's).

    Args:
        num_channels (int): channels ``C``.
    """

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, num_channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grn(x, self.gamma, self.beta)


class LayerScale(nn.Module):
    """Per-channel affine ``x * weight + bias``.

    Stored as a depthwise 1x1 convolution (``weight`` [C, 1, 1, 1], ``bias`` [C]) because that is
    the released checkpoints' layout.
    """

    def __init__(self, num_channels: int, init_value: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((num_channels, 1, 1, 1), float(init_value)))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


def layer_scale_or_identity(num_channels: int, init_value: Optional[float]) -> nn.Module:
    return nn.Identity() if init_value is None else LayerScale(num_channels, init_value)
