"""Normalisation and scaling layers of OverLoCK (docs/spec/ARCHITECTURE.md, "Building blocks")."""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.grn import grn


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
