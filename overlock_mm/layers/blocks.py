"""OverLoCK blocks: RepConvBlock (Base-/Overview-Net) and DynamicConvBlock (Focus-Net).

Module names and the order of operations follow the released checkpoints
(docs/spec/ARCHITECTURE.md).
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn.bricks import DropPath

from ..ops import prefers_pixel_major
from ..utils.activation_checkpoint import sequential_with_recompute
from .contmix import NUM_REGIONS_SIDE, contmix_aggregate, contmix_kernels
from .conv import DWConv2d, ResDWConv, SEModule, conv_bn
from .norm import GRN, BatchNorm2d, LayerNorm2d, LayerScale, layer_scale_or_identity
from .reparam import DilatedReparamBlock


def drop_path_or_identity(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0 else nn.Identity()


def run_sequential(seq: nn.Sequential, x: torch.Tensor, recompute: Tuple[Tuple[int, int], ...],
                   memory_efficient: bool) -> torch.Tensor:
    """``seq(x)``; in a training forward with ``memory_efficient``, the layer ranges in
    ``recompute`` are run again in backward instead of keeping their activations."""
    if memory_efficient and seq.training and torch.is_grad_enabled():
        return sequential_with_recompute(seq, x, recompute)
    return seq(x)


class RepConvBlock(nn.Module):
    """Large-kernel block of the Base-Net and the Overview-Net.

    ``x = dwconv(x); x = ls(x) + proj(x)`` with ``proj`` = LN, dilated re-param large kernel, BN,
    SE, 1x1 expand, GELU, residual DW 3x3, GRN, 1x1 reduce, DropPath (``res_scale`` form).

    Args:
        dim (int): channels.
        kernel_size (int): large kernel size of the stage.
        mlp_ratio (float): expansion of the 1x1 MLP.
        ls_init_value (float, optional): LayerScale init; None makes ``ls`` an identity.
        drop_path (float): stochastic depth rate.
        deploy (bool): build the re-parameterised form directly.
        memory_efficient (bool): in training, recompute the layers of :attr:`RECOMPUTE` in
            backward instead of keeping their activations (same outputs, gradients and
            BatchNorm statistics). Defaults to True.
    """

    #: ``proj`` layers recomputed in backward under ``memory_efficient``. [LN, dilated branches,
    #: BN, SE]: none of the ten ``dim`` maps inside is kept (seven are the branches' BatchNorm
    #: inputs at K >= 13; the range's input is kept by ``ls`` anyway). [GELU, DW 3x3, GRN]: two
    #: of the four ``hidden`` maps are not kept. Both are cheap to run again next to the 1x1
    #: convolutions around them, which are not recomputed.
    RECOMPUTE = ((0, 4), (5, 8))

    def __init__(self, dim: int, kernel_size: int, mlp_ratio: float = 4.,
                 ls_init_value: Optional[float] = None, drop_path: float = 0.,
                 deploy: bool = False, memory_efficient: bool = True) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.memory_efficient = memory_efficient
        self.dwconv = ResDWConv(dim)
        self.proj = nn.Sequential(
            LayerNorm2d(dim),
            DilatedReparamBlock(dim, kernel_size, deploy=deploy),
            BatchNorm2d(dim),
            SEModule(dim),
            nn.Conv2d(dim, hidden, 1),
            nn.GELU(),
            ResDWConv(hidden),
            GRN(hidden),
            nn.Conv2d(hidden, dim, 1),
            drop_path_or_identity(drop_path),
        )
        self.ls = layer_scale_or_identity(dim, ls_init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dwconv(x)
        return self.ls(x) + run_sequential(self.proj, x, self.RECOMPUTE, self.memory_efficient)


class DynamicConvBlock(nn.Module):
    """Focus-Net block: ContMix dynamic convolution guided by the context prior.

    Args:
        dim (int): feature channels ``C``.
        ctx_dim (int): channels of the last stage ``C3``; the context has ``C3 // 4`` channels.
        kernel_size (int): the large dynamic kernel ``K`` (also the ``lepe`` kernel).
        smk_size (int): the small dynamic kernel ``s``.
        num_heads (int): ``h``; ContMix uses ``G = 2h`` groups per kernel.
        mlp_ratio (float): expansion of the block's MLP.
        ls_init_value (float): LayerScale init of ``ls1`` / ``ls2``.
        drop_path (float): stochastic depth rate.
        is_first (bool): the very first block of the Focus-Net has no ``x_scale`` / ``h_scale``
            (the context *is* the prior there).
        is_last (bool): the last block returns the concatenated ``C + C3 // 4`` channels.
        deploy (bool): build the re-parameterised form directly.
        contmix_impl (str): aggregation implementation (see :func:`overlock_mm.ops.na2d_av`).
        memory_efficient (bool): in training, recompute ``fusion``'s [DW 3x3, BN, GELU], the
            whole ``lepe`` (dilated branches + BN) and ``mlp``'s [GELU, DW 3x3, GRN] in
            backward instead of keeping their activations (as in :class:`RepConvBlock`).
            Defaults to True.
    """

    #: recomputed layer ranges of ``fusion``, ``lepe`` and ``mlp`` under ``memory_efficient``.
    RECOMPUTE_FUSION = ((0, 3),)
    RECOMPUTE_LEPE = ((0, 2),)
    RECOMPUTE_MLP = ((1, 4),)

    def __init__(self, dim: int, ctx_dim: int, kernel_size: int, smk_size: int = 5,
                 num_heads: int = 2, mlp_ratio: float = 3., ls_init_value: float = 1.,
                 drop_path: float = 0., is_first: bool = False, is_last: bool = False,
                 deploy: bool = False, contmix_impl: str = 'auto',
                 memory_efficient: bool = True) -> None:
        super().__init__()
        self.memory_efficient = memory_efficient
        cd = ctx_dim // 4
        out_dim = dim + cd
        groups = 2 * num_heads
        mlp_dim = int(dim * mlp_ratio)
        self.dim, self.ctx_channels = dim, cd
        self.kernel_size, self.smk_size = kernel_size, smk_size
        self.num_groups = groups
        self.scale = (dim // groups) ** -0.5
        self.is_first, self.is_last = is_first, is_last
        self.contmix_impl = contmix_impl

        self.rpb1 = nn.Parameter(torch.zeros(groups, 2 * smk_size - 1, 2 * smk_size - 1))
        self.rpb2 = nn.Parameter(torch.zeros(groups, 2 * kernel_size - 1, 2 * kernel_size - 1))
        if not is_first:
            self.x_scale = LayerScale(cd, 1.)
            self.h_scale = LayerScale(cd, 1.)
        self.dwconv1 = ResDWConv(out_dim)
        self.norm1 = LayerNorm2d(out_dim)
        self.fusion = nn.Sequential(
            DWConv2d(out_dim, 3, padding=1),
            BatchNorm2d(out_dim),
            nn.GELU(),
            nn.Conv2d(out_dim, dim, 1),
            GRN(dim),
        )
        self.weight_query = conv_bn(dim, dim // 2)
        self.weight_key = nn.Sequential(
            nn.AdaptiveAvgPool2d(NUM_REGIONS_SIDE),
            *conv_bn(cd, dim // 2),
        )
        self.weight_proj = nn.Conv2d(NUM_REGIONS_SIDE ** 2, kernel_size ** 2 + smk_size ** 2, 1)
        self.dyconv_proj = conv_bn(dim, dim)
        self.lepe = nn.Sequential(
            DilatedReparamBlock(dim, kernel_size, deploy=deploy),
            BatchNorm2d(dim),
        )
        self.se_layer = SEModule(dim)
        self.gate = nn.Sequential(*conv_bn(dim, dim), nn.SiLU())
        self.proj = nn.Sequential(BatchNorm2d(dim), nn.Conv2d(dim, out_dim, 1))
        self.dwconv2 = ResDWConv(out_dim)
        self.norm2 = LayerNorm2d(out_dim)
        self.mlp = nn.Sequential(
            nn.Conv2d(out_dim, mlp_dim, 1),
            nn.GELU(),
            ResDWConv(mlp_dim),
            GRN(mlp_dim),
            nn.Conv2d(mlp_dim, out_dim, 1),
        )
        self.ls1 = LayerScale(out_dim, ls_init_value)
        self.ls2 = LayerScale(out_dim, ls_init_value)
        self.drop_path = drop_path_or_identity(drop_path)

    def _resized_size(self, h: int, w: int) -> Tuple[int, int]:
        """Maps smaller than ``K`` are upsampled so the short side is ``K`` (spec step 3)."""
        k = self.kernel_size
        if min(h, w) >= k:
            return h, w
        return (k, int(k / h * w)) if h < w else (int(k / w * h), k)

    def contmix(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Dynamic depthwise convolution of ``x`` with kernels generated from ``f``."""
        b, _, h, w = x.shape
        size = self._resized_size(h, w)
        if size != (h, w):
            x = F.interpolate(x, size=size, mode='bilinear', align_corners=False)
            f = F.interpolate(f, size=size, mode='bilinear', align_corners=False)
        hh, ww = size
        query, context = f.split([self.dim, self.ctx_channels], dim=1)
        g = self.num_groups
        query = (self.weight_query(query) * self.scale).view(b, g, -1, hh * ww)
        key = self.weight_key(context).view(b, g, -1, NUM_REGIONS_SIDE ** 2)
        affinity = torch.einsum('bgcn,bgcl->bgnl', query, key)  # [B, G, HW, 49]
        # in the layout the aggregation reads fastest (pixel-major for the CPU kernel)
        pixel_major = prefers_pixel_major(self.contmix_impl, x.device.type)
        small, large = contmix_kernels(affinity, self.weight_proj, self.rpb1, self.rpb2, hh, ww,
                                       pixel_major)
        x = contmix_aggregate(x, small, large, (self.smk_size, self.kernel_size),
                              impl=self.contmix_impl)
        if size != (h, w):
            x = F.adaptive_avg_pool2d(x, (h, w))
        return x

    def forward(self, x: torch.Tensor, h_x: torch.Tensor, h_r: torch.Tensor):
        if not self.is_first:
            h_x = self.x_scale(h_x) + self.h_scale(h_r)
        f = self.dwconv1(torch.cat([x, h_x], dim=1))
        identity = f
        f = self.norm1(f)
        lean = self.memory_efficient
        x = run_sequential(self.fusion, f, self.RECOMPUTE_FUSION, lean)
        gate = self.gate(x)
        lepe = run_sequential(self.lepe, x, self.RECOMPUTE_LEPE, lean)
        x = self.contmix(x, f)
        x = self.dyconv_proj(x) + lepe
        x = self.se_layer(x)
        x = self.proj(gate * x)
        x = self.ls1(identity) + self.drop_path(x)
        x = self.dwconv2(x)
        x = self.ls2(x) + self.drop_path(
            run_sequential(self.mlp, self.norm2(x), self.RECOMPUTE_MLP, lean))
        if self.is_last:
            return x, None
        return x[:, :self.dim], x[:, self.dim:]
