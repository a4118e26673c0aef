"""Convolutional building blocks shared by the Base-, Overview- and Focus-Nets."""
import torch
import torch.nn as nn

from ..ops.dwconv import depthwise_conv2d
from .norm import BatchNorm2d


class DWConv2d(nn.Conv2d):
    """Depthwise ``nn.Conv2d`` (``groups = in = out channels``) on :func:`depthwise_conv2d`.

    Same parameters, state-dict keys and results as ``nn.Conv2d``; on CPU it runs the faster
    large-kernel forward and weight gradient of ``overlock_mm/ops/dwconv.py``.
    """

    def __init__(self, channels: int, kernel_size: int, padding: int = 0, dilation: int = 1,
                 bias: bool = True) -> None:
        super().__init__(channels, channels, kernel_size, padding=padding, dilation=dilation,
                         groups=channels, bias=bias)

    #: ``x + conv(x)`` instead of ``conv(x)`` (:class:`ResDWConv`)
    residual = False

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias):
        return depthwise_conv2d(input, weight, bias, self.stride, self.padding, self.dilation,
                                residual=self.residual)


class ResDWConv(DWConv2d):
    """Residual depthwise 3x3 convolution: ``x + dwconv(x)``.

    Subclasses ``nn.Conv2d`` so its parameters sit directly on the module (``<name>.weight``),
    as in the released checkpoints.
    """

    # x + conv(x) in one pass where the CPU 3x3 kernel runs (ops/dwconv.py)
    residual = True

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__(channels, kernel_size, padding=kernel_size // 2, bias=True)


class SEModule(nn.Module):
    """Squeeze-and-excitation with ``max(16, C // 8)`` hidden channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(16, channels // 8)
        self.proj = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.GELU(),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.proj(x)


def conv_bn(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
            groups: int = 1) -> nn.Sequential:
    """``[0 Conv (no bias), 1 BatchNorm]`` -- the released ``*.0`` / ``*.1`` key pattern."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                  groups=groups, bias=False),
        BatchNorm2d(out_channels),
    )
