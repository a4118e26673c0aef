"""Layers of MogaNet (Li et al., "MogaNet: Multi-order Gated Aggregation Network", ICLR 2024,
arXiv 2211.03295), written from the paper's description (Sec. 4, Fig. 3-5, Appendix A).

Sources of the facts used here:

* structure and formulas -- the paper: a MogaBlock is ``x + ls1 * Moga(BN(x))`` then
  ``x + ls2 * CA-FFN(BN(x))``. The spatial aggregation ("Moga") is feature decomposition
  ``Y = act(Z + gamma_s * (Z - GAP(Z)))`` with ``Z = Conv1x1(X)``, a gating branch
  ``G = Conv1x1(Y)`` and a multi-order context branch (DW 5x5 on all channels, then the channels
  split 1:3:4 into an identity part, a DW 5x5 dilation-2 part and a DW 7x7 dilation-3 part,
  concatenated and mixed by a 1x1 conv), combined as ``Conv1x1(SiLU(G) * SiLU(V))`` plus an inner
  residual. The channel aggregation FFN is ``Conv1x1 -> DW 3x3 -> GELU``, then
  ``Y + gamma_c * (Y - GELU(Conv1x1_{C->1}(Y)))``, then ``Conv1x1``.
* parameter names and shapes -- the authors' released checkpoints
  (``tests/data/baseline_keys/moganet_*.tsv``: ``attn.proj_1``, ``attn.gate``,
  ``attn.value.DW_conv{0,1,2}``, ``attn.value.PW_conv``, ``attn.proj_2``, ``attn.sigma.scale``,
  ``mlp.fc1/dwconv/fc2/decompose``, ``mlp.sigma.scale``, ``layer_scale_{1,2}`` of shape
  ``[1, C, 1, 1]``). The channel split sizes follow from those shapes: ``int(3/8 C)`` and
  ``int(4/8 C)``, the rest is the identity part.
* activations (SiLU in the gated aggregation and its decomposition, GELU in the FFN), the
  1e-5 init of both element scales and layer scales, BatchNorm eps 1e-5 and dilations (1, 2, 3)
  in every stage -- the authors' public model definition (GitHub Westlake-AI/MogaNet,
  ``models/moganet.py`` defaults, used unchanged by their mmdet/mmseg configs).
"""
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn.bricks import DropPath

from .conv import DWConv2d
from .norm import BatchNorm2d


class ElementScale(nn.Module):
    """A learnable per-channel scale ``x * scale`` (``scale``: ``[1, C, 1, 1]``).

    Args:
        channels (int): number of channels.
        init_value (float): initial value of every entry. Defaults to 0.
    """

    def __init__(self, channels: int, init_value: float = 0.) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((1, channels, 1, 1), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def _split_sizes(channels: int, ratios: Sequence[int]) -> Sequence[int]:
    """Channel sizes of the identity / mid-order / high-order parts (ratio 1:3:4 by default)."""
    total = sum(ratios)
    mid = int(ratios[1] / total * channels)
    high = int(ratios[2] / total * channels)
    return channels - mid - high, mid, high


class MultiOrderDWConv(nn.Module):
    """The multi-order context branch: DW 5x5 (dilation d0) on every channel, then the channels
    split ``channel_split`` into identity, DW 5x5 (dilation d1) and DW 7x7 (dilation d2) parts,
    concatenated and mixed by a 1x1 conv (``PW_conv``).

    Args:
        channels (int): number of channels.
        dilations (Sequence[int]): dilations of ``DW_conv0``, ``DW_conv1``, ``DW_conv2``.
            Defaults to ``(1, 2, 3)``.
        channel_split (Sequence[int]): relative sizes of the three parts. Defaults to
            ``(1, 3, 4)``.
    """

    def __init__(self, channels: int, dilations: Sequence[int] = (1, 2, 3),
                 channel_split: Sequence[int] = (1, 3, 4)) -> None:
        super().__init__()
        if len(dilations) != 3 or len(channel_split) != 3:
            raise ValueError(f'MultiOrderDWConv needs 3 dilations and 3 split ratios, got '
                             f'{tuple(dilations)} and {tuple(channel_split)}.')
        if channels % sum(channel_split):
            raise ValueError(f'MultiOrderDWConv: channels={channels} must be divisible by '
                             f'sum(channel_split)={sum(channel_split)}.')
        self.splits = _split_sizes(channels, channel_split)
        c0, c1, c2 = self.splits

        def dw(c: int, k: int, d: int) -> nn.Conv2d:
            return DWConv2d(c, k, padding=d * (k - 1) // 2, dilation=d)

        self.DW_conv0 = dw(channels, 5, dilations[0])
        self.DW_conv1 = dw(c1, 5, dilations[1])
        self.DW_conv2 = dw(c2, 7, dilations[2])
        self.PW_conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.DW_conv0(x)
        low, mid, high = torch.split(x, list(self.splits), dim=1)
        x = torch.cat([low, self.DW_conv1(mid), self.DW_conv2(high)], dim=1)
        return self.PW_conv(x)


class MultiOrderGatedAggregation(nn.Module):
    """MogaNet's spatial aggregation (``attn``): feature decomposition, gate and context
    branches, ``proj_2(SiLU(gate) * SiLU(value))`` plus the input.

    Args:
        channels (int): number of channels.
        dilations (Sequence[int]): dilations of the context branch. Defaults to ``(1, 2, 3)``.
        channel_split (Sequence[int]): channel split of the context branch. Defaults to
            ``(1, 3, 4)``.
        act_type (str): ``'SiLU'``, ``'GELU'`` or ``'ReLU'``. Defaults to ``'SiLU'``.
    """

    def __init__(self, channels: int, dilations: Sequence[int] = (1, 2, 3),
                 channel_split: Sequence[int] = (1, 3, 4), act_type: str = 'SiLU') -> None:
        super().__init__()
        self.proj_1 = nn.Conv2d(channels, channels, 1)
        self.gate = nn.Conv2d(channels, channels, 1)
        self.value = MultiOrderDWConv(channels, dilations, channel_split)
        self.proj_2 = nn.Conv2d(channels, channels, 1)
        self.act_value = build_activation(act_type)
        self.act_gate = build_activation(act_type)
        self.sigma = ElementScale(channels, 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.proj_1(x)
        # Feature decomposition: push the features away from their global average.
        x = self.act_value(x + self.sigma(x - F.adaptive_avg_pool2d(x, 1)))
        x = self.proj_2(self.act_gate(self.gate(x)) * self.act_gate(self.value(x)))
        return x + shortcut


class ChannelAggregationFFN(nn.Module):
    """MogaNet's FFN with channel aggregation (``mlp``).

    Args:
        channels (int): input/output channels.
        hidden_channels (int): expanded channels.
        kernel_size (int): depthwise kernel size. Defaults to 3.
        drop (float): dropout after the activation and at the output. Defaults to 0.
    """

    def __init__(self, channels: int, hidden_channels: int, kernel_size: int = 3,
                 drop: float = 0.) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden_channels, 1)
        self.dwconv = DWConv2d(hidden_channels, kernel_size, padding=kernel_size // 2)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_channels, channels, 1)
        self.drop = nn.Dropout(drop)
        # Channel aggregation: a C -> 1 projection gives the shared (channel-wise) component.
        self.decompose = nn.Conv2d(hidden_channels, 1, 1)
        self.sigma = ElementScale(hidden_channels, 1e-5)
        self.decompose_act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x))))
        x = x + self.sigma(x - self.decompose_act(self.decompose(x)))
        return self.drop(self.fc2(x))


class MogaBlock(nn.Module):
    """One MogaNet block: ``x + ls1 * attn(BN(x))``, then ``x + ls2 * mlp(BN(x))``.

    Args:
        channels (int): number of channels.
        ffn_ratio (float): FFN expansion. Defaults to 4.
        drop (float): dropout rate in the FFN. Defaults to 0.
        drop_path (float): stochastic depth rate. Defaults to 0.
        init_value (float): layer-scale init. Defaults to 1e-5.
        dilations (Sequence[int]): context-branch dilations. Defaults to ``(1, 2, 3)``.
        channel_split (Sequence[int]): context-branch channel split. Defaults to ``(1, 3, 4)``.
        attn_act_type (str): activation of the gated aggregation. Defaults to ``'SiLU'``.
    """

    def __init__(self, channels: int, ffn_ratio: float = 4., drop: float = 0.,
                 drop_path: float = 0., init_value: float = 1e-5,
                 dilations: Sequence[int] = (1, 2, 3), channel_split: Sequence[int] = (1, 3, 4),
                 attn_act_type: str = 'SiLU') -> None:
        super().__init__()
        self.norm1 = BatchNorm2d(channels)
        self.attn = MultiOrderGatedAggregation(channels, dilations, channel_split, attn_act_type)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = BatchNorm2d(channels)
        self.mlp = ChannelAggregationFFN(channels, int(channels * ffn_ratio), drop=drop)
        self.layer_scale_1 = nn.Parameter(torch.full((1, channels, 1, 1), float(init_value)))
        self.layer_scale_2 = nn.Parameter(torch.full((1, channels, 1, 1), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.layer_scale_2 * self.mlp(self.norm2(x)))


_ACTIVATIONS = {'SiLU': nn.SiLU, 'GELU': nn.GELU, 'ReLU': nn.ReLU}


def build_activation(act_type: str) -> nn.Module:
    """``'SiLU'``, ``'GELU'`` or ``'ReLU'`` as a module."""
    if act_type not in _ACTIVATIONS:
        raise ValueError(f"unknown activation '{act_type}'; valid: {', '.join(_ACTIVATIONS)}.")
    return _ACTIVATIONS[act_type]()
