"""Layers of UniRepLKNet (Ding et al., "UniRepLKNet: A Universal Perception Large-Kernel ConvNet
for Audio, Video, Point Cloud, Time-Series and Image Recognition", CVPR 2024, arXiv 2311.15599),
written from the paper's description (Sec. 3-4, Fig. 2 and 3).

Sources of the facts used here:

* block structure -- the paper: depthwise conv (a Dilated Reparam Block for large kernels) ->
  BN -> SE -> FFN (1x1 expansion, GELU, GRN, 1x1 reduction, BN), layer scale, drop path,
  residual. The re-parameterisation fuses the BNs into the depthwise kernel, and the GRN bias, the
  second BN and the layer scale into the last linear layer.
* the dilated branches per large kernel size (kernel sizes and dilations of the parallel small
  kernels) -- the paper's Sec. 3.2 / its public code (GitHub AILab-CVC/UniRepLKNet,
  ``unireplknet.py``); they differ from OverLoCK's table (no dense 7x7 branch), hence
  :data:`UNIREPLKNET_BRANCHES`. Kernel 3/5 blocks use a plain depthwise conv.
* names and shapes -- the released checkpoints (``tests/data/baseline_keys/unireplknet_*.tsv``):
  ``gamma`` [C], ``dwconv`` (``lk_origin``/``origin_bn``/``dil_conv_k{k}_{r}``/``dil_bn_k{k}_{r}``
  for large kernels), ``norm`` (BN), ``se.down``/``se.up`` (C -> C/4 -> C 1x1 convs),
  ``pwconv1.1`` (Linear, channels-last), ``act.1.gamma/beta`` ([1, 1, 1, 4C], GRN on NHWC),
  ``pwconv2.0`` (Linear without bias) and ``pwconv2.2`` (BN). The deploy form keeps these names:
  ``dwconv.lk_origin.{weight,bias}`` (large kernels) or ``dwconv.{weight,bias}``,
  ``act.1.gamma`` and a biased ``pwconv2.0``, as in the authors' ``*_deploy`` configs.
"""
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn.bricks import DropPath

from ..ops.grn import grn
from .conv import DWConv2d
from .norm import BatchNorm2d
from .reparam import DilatedReparamBlock

#: UniRepLKNet: large kernel size -> ((small kernel, dilation), ...) of the dilated branches.
UNIREPLKNET_BRANCHES: Dict[int, Tuple[Tuple[int, int], ...]] = {
    17: ((5, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
    15: ((5, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
    13: ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
    11: ((5, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    9: ((5, 1), (5, 2), (3, 3), (3, 4)),
    7: ((5, 1), (3, 2), (3, 3)),
}
#: kernel sizes of the blocks that use a plain depthwise conv (no dilated branches).
PLAIN_KERNELS = (3, 5)


class UniRepLKReparamBlock(DilatedReparamBlock):
    """UniRepLKNet's Dilated Reparam Block: :class:`DilatedReparamBlock` (same names, forward,
    BN fusion and :meth:`switch_to_deploy`) with UniRepLKNet's branch table.

    Args:
        channels (int): number of channels (depthwise).
        kernel_size (int): the large kernel; one of :data:`UNIREPLKNET_BRANCHES`.
        deploy (bool): build the fused single-conv form directly. Defaults to False.
    """

    def __init__(self, channels: int, kernel_size: int, deploy: bool = False) -> None:
        nn.Module.__init__(self)
        if kernel_size not in UNIREPLKNET_BRANCHES:
            raise ValueError(f'UniRepLKReparamBlock has no branch table for kernel size '
                             f'{kernel_size}; valid sizes: {sorted(UNIREPLKNET_BRANCHES)}.')
        self.channels = channels
        self.kernel_size = kernel_size
        self.branches = list(UNIREPLKNET_BRANCHES[kernel_size])
        self.deploy = deploy
        self.lk_origin = DWConv2d(channels, kernel_size, padding=kernel_size // 2, bias=deploy)
        if deploy:
            return
        self.origin_bn = BatchNorm2d(channels)
        for k, r in self.branches:
            self.add_module(f'dil_conv_k{k}_{r}',
                            DWConv2d(channels, k, padding=r * (k - 1) // 2, dilation=r,
                                     bias=False))
            self.add_module(f'dil_bn_k{k}_{r}', BatchNorm2d(channels))

    @staticmethod
    def valid_kernel_sizes() -> list:
        return sorted(UNIREPLKNET_BRANCHES)


class ToChannelsLast(nn.Module):
    """NCHW -> NHWC."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class ToChannelsFirst(nn.Module):
    """NHWC -> NCHW."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class GRNChannelsLast(nn.Module):
    """Global Response Normalisation (ConvNeXt V2) on NHWC tensors.

    ``g = ||x||_2`` over (H, W), ``n = g / (mean_c(g) + 1e-6)``, ``(gamma * n + 1) * x + beta``.

    Args:
        channels (int): number of channels.
        use_bias (bool): whether ``beta`` exists (the deploy form folds it into the next
            linear layer). Defaults to True.
    """

    def __init__(self, channels: int, use_bias: bool = True) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, channels))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, channels)) if use_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grn(x, self.gamma, self.beta, channel_dim=-1)


class SEBlock(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(up(relu(down(GAP(x)))))``.

    Args:
        channels (int): number of channels.
        hidden (int): squeezed channels (``channels // 4`` in UniRepLKNet).
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, hidden, 1)
        self.up = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.up(F.relu(self.down(F.adaptive_avg_pool2d(x, 1)))))
        return x * s


def _bn_scale(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` with ``BN(y) = s * y + t`` in eval mode."""
    s = bn.weight / (bn.running_var + bn.eps).sqrt()
    return s, bn.bias - bn.running_mean * s


class UniRepLKNetBlock(nn.Module):
    """One UniRepLKNet block (training form, or the re-parameterised form with ``deploy``).

    Args:
        dim (int): channels.
        kernel_size (int): depthwise kernel: 3 or 5 (plain conv) or a key of
            :data:`UNIREPLKNET_BRANCHES` (dilated re-param block).
        drop_path (float): stochastic depth rate. Defaults to 0.
        layer_scale_init_value (float): init of ``gamma``; 0 or None disables it.
            Defaults to 1e-6.
        deploy (bool): build the fused inference form directly. Defaults to False.
        ffn_factor (float): FFN expansion. Defaults to 4.
    """

    def __init__(self, dim: int, kernel_size: int, drop_path: float = 0.,
                 layer_scale_init_value: float = 1e-6, deploy: bool = False,
                 ffn_factor: float = 4) -> None:
        super().__init__()
        self.deploy = deploy
        if kernel_size in PLAIN_KERNELS:
            self.dwconv = DWConv2d(dim, kernel_size, padding=kernel_size // 2, bias=deploy)
        elif kernel_size in UNIREPLKNET_BRANCHES:
            self.dwconv = UniRepLKReparamBlock(dim, kernel_size, deploy=deploy)
        else:
            raise ValueError(f'UniRepLKNetBlock: kernel size {kernel_size} is not supported; valid '
                             f'sizes: {sorted(PLAIN_KERNELS + tuple(UNIREPLKNET_BRANCHES))}.')
        self.norm = nn.Identity() if deploy else BatchNorm2d(dim)
        self.se = SEBlock(dim, dim // 4)
        hidden = int(ffn_factor * dim)
        self.pwconv1 = nn.Sequential(ToChannelsLast(), nn.Linear(dim, hidden))
        self.act = nn.Sequential(nn.GELU(), GRNChannelsLast(hidden, use_bias=not deploy))
        if deploy:
            self.pwconv2 = nn.Sequential(nn.Linear(hidden, dim), ToChannelsFirst())
        else:
            self.pwconv2 = nn.Sequential(nn.Linear(hidden, dim, bias=False), ToChannelsFirst(),
                                         BatchNorm2d(dim))
        use_gamma = not deploy and layer_scale_init_value is not None and layer_scale_init_value > 0
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init_value))) \
            if use_gamma else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(self.norm(self.dwconv(x)))
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, 1, 1)
        return x + self.drop_path(y)

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        """Fuse (eval-mode statistics) into the inference form; outputs stay equal."""
        if self.deploy:
            return
        s, t = _bn_scale(self.norm)
        if isinstance(self.dwconv, UniRepLKReparamBlock):
            self.dwconv.switch_to_deploy()  # dilated branches -> one biased lk_origin
            conv = self.dwconv.lk_origin
            conv.bias.copy_(conv.bias * s + t)
            conv.weight.mul_(s.view(-1, 1, 1, 1))
        else:
            old = self.dwconv
            conv = DWConv2d(old.in_channels, old.kernel_size[0], padding=old.padding[0],
                            bias=True)
            conv.to(old.weight.device, old.weight.dtype)
            conv.weight.copy_(old.weight * s.view(-1, 1, 1, 1))
            conv.bias.copy_(t)
            self.dwconv = conv
        self.norm = nn.Identity()

        # y = gamma * BN(W (GRN(x) - beta) + W beta): fold beta, BN and gamma into one linear.
        scale = self.gamma if self.gamma is not None else 1.
        linear, bn = self.pwconv2[0], self.pwconv2[2]
        grn = self.act[1]
        s, t = _bn_scale(bn)
        bias = linear.weight @ grn.beta.view(-1)
        fused = nn.Linear(linear.in_features, linear.out_features, bias=True)
        fused.to(linear.weight.device, linear.weight.dtype)
        fused.weight.copy_(linear.weight * (s * scale).view(-1, 1))
        fused.bias.copy_((bias * s + t) * scale)
        grn.beta = None
        self.pwconv2 = nn.Sequential(fused, self.pwconv2[1])
        self.gamma = None
        self.deploy = True
