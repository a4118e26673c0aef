"""The MogaNet backbone (Li et al., "MogaNet: Multi-order Gated Aggregation Network", ICLR 2024,
arXiv 2211.03295) for mmdet / mmseg / mmpretrain, as a baseline next to OverLoCK.

Four stages of :class:`~overlock_mm.layers.moga.MogaBlock` at strides 4/8/16/32; the stem is two
stride-2 3x3 convs (BN, GELU between), later stages downsample with one stride-2 3x3 conv + BN,
and each stage ends with a BatchNorm (``norm{i}``) whose output is the stage's feature map.

Sources: the architecture and the variants' widths/depths/FFN ratios are the paper's (Table A1);
the parameter names and shapes are the authors' released checkpoints (the ``fork_feat`` dense
backbone of their mmdet/mmseg plugins and the ImageNet classifier share them, the classifier adds
``head``): ``tests/data/baseline_keys/moganet_*.tsv``. Drop path rises linearly over all blocks;
BN everywhere; the mmdet/mmseg recipes live in ``configs/``. Facts about the released training
code (e.g. its ``frozen_stages`` being ignored) are cited in ``docs/baselines.md``.
"""
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from mmengine.logging import MMLogger
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers.moga import MogaBlock
from ..layers.norm import BatchNorm2d
from ..registry import MODELS
from ..utils.activation_checkpoint import checkpoint_block
from ._baseline_utils import load_released_weights
from ._checks import (check_frozen_stages, check_input, check_out_indices, per_stage_flags,
                      is_int, pretrained_and_rest, select_arch)
from ._freezing import FrozenStagesMixin

ARCH_FIELDS = ('embed_dims', 'depths', 'ffn_ratios')

#: ImageNet-1K weights released by the authors (GitHub Westlake-AI/MogaNet, release
#: "moganet-in1k-weights"); ``{'state_dict': ...}`` files in the classification layout.
RELEASED_IN1K = {
    arch: 'https://github.com/Westlake-AI/MogaNet/releases/download/moganet-in1k-weights/'
          f'moganet_{arch}_sz224_8xbs{bs}_ep300.pth.tar'
    for arch, bs in (('xtiny', 128), ('tiny', 128), ('small', 128), ('base', 128),
                     ('large', 64))
}


class StemConv(nn.Module):
    """``patch_embed1``: conv 3x3/2 (C/2), BN, GELU, conv 3x3/2 (C), BN
    (``projection.{0,1,3,4}``)."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.projection = nn.Sequential(
            nn.Conv2d(in_channels, dim // 2, 3, 2, 1), BatchNorm2d(dim // 2), nn.GELU(),
            nn.Conv2d(dim // 2, dim, 3, 2, 1), BatchNorm2d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)


class ConvDownsample(nn.Module):
    """``patch_embed{2,3,4}``: conv 3x3/2 with bias (``projection``) and BN (``norm``)."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.projection = nn.Conv2d(in_channels, dim, 3, 2, 1)
        self.norm = BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.projection(x))


@MODELS.register_module()
class MogaNet(FrozenStagesMixin, BaseModule):
    """MogaNet backbone with the dense-pyramid outputs of the authors' ``fork_feat`` model.

    Args:
        arch (str | dict): ``'xtiny'``, ``'tiny'``, ``'small'``, ``'base'``, ``'large'`` (or
            ``'xt'``, ``'t'``, ``'s'``, ``'b'``, ``'l'``), or a dict with ``embed_dims``,
            ``depths`` and ``ffn_ratios`` (4 entries each). Defaults to ``'tiny'``.
        in_channels (int): input channels. Defaults to 3.
        out_indices (Sequence[int] | int): stages to return (0-3: strides 4/8/16/32, each after
            its ``norm{i+1}``). Defaults to ``(0, 1, 2, 3)``.
        drop_rate (float): dropout in the FFNs. Defaults to 0.
        drop_path_rate (float): stochastic depth, rising linearly over the blocks. Defaults to 0.
        init_value (float): layer-scale init. Defaults to 1e-5.
        attn_dw_dilation (Sequence[int]): dilations of the multi-order DW convs.
            Defaults to ``(1, 2, 3)``.
        attn_channel_split (Sequence[int]): channel split of the multi-order DW convs.
            Defaults to ``(1, 3, 4)``.
        attn_act_type (str): activation of the gated aggregation. Defaults to ``'SiLU'``.
        frozen_stages (int): freeze (eval mode, no grad) stages ``0 .. frozen_stages - 1``
            (patch embedding, blocks and norm). -1 or 0 freezes nothing. Defaults to -1.
        norm_eval (bool): keep every BatchNorm in eval mode while training. Defaults to False.
        with_cp (bool | Sequence[bool]): gradient checkpointing of the blocks, one flag or one per
            stage; BatchNorm statistics move once per step, as without it
            (:func:`~overlock_mm.utils.activation_checkpoint.checkpoint_block`). Defaults to False.
        init_cfg (dict | list[dict], optional): e.g. ``dict(type='Pretrained',
            checkpoint=RELEASED_IN1K['small'])``; the classifier ``head`` of ImageNet
            checkpoints is skipped, mmdet/mmseg checkpoints (``backbone.`` keys) load too.
    """

    arch_settings: Dict[str, dict] = {
        'xtiny': dict(embed_dims=[32, 64, 96, 192], depths=[3, 3, 10, 2], ffn_ratios=[8, 8, 4, 4]),
        'tiny': dict(embed_dims=[32, 64, 128, 256], depths=[3, 3, 12, 2], ffn_ratios=[8, 8, 4, 4]),
        'small': dict(embed_dims=[64, 128, 320, 512], depths=[2, 3, 12, 2],
                      ffn_ratios=[8, 8, 4, 4]),
        'base': dict(embed_dims=[64, 160, 320, 512], depths=[4, 6, 22, 3],
                     ffn_ratios=[8, 8, 4, 4]),
        'large': dict(embed_dims=[64, 160, 320, 640], depths=[4, 6, 44, 4],
                      ffn_ratios=[8, 8, 4, 4]),
    }
    arch_aliases = {'xt': 'xtiny', 'x-tiny': 'xtiny', 't': 'tiny', 's': 'small', 'b': 'base',
                    'l': 'large'}
    num_stages = 4

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 in_channels: int = 3,
                 out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3),
                 drop_rate: float = 0.,
                 drop_path_rate: float = 0.,
                 init_value: float = 1e-5,
                 attn_dw_dilation: Sequence[int] = (1, 2, 3),
                 attn_channel_split: Sequence[int] = (1, 3, 4),
                 attn_act_type: str = 'SiLU',
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: Union[bool, Sequence[bool]] = False,
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.arch = self._parse_arch(arch)
        dims, depths = self.arch['embed_dims'], self.arch['depths']
        split = sum(attn_channel_split)
        for i, c in enumerate(dims):
            if c % split:
                raise ValueError(f'MogaNet: embed_dims[{i}]={c} must be divisible by '
                                 f'sum(attn_channel_split)={split} (the multi-order convs split '
                                 f'the channels {":".join(map(str, attn_channel_split))}).')
        self.embed_dims = list(dims)
        self.out_channels = list(dims)
        self.in_channels = in_channels
        self.out_indices = check_out_indices('MogaNet', out_indices, self.num_stages,
                                             'stages at strides 4/8/16/32')
        self.with_cp = per_stage_flags('MogaNet', 'with_cp', with_cp, self.num_stages)
        self.frozen_stages = check_frozen_stages(
            'MogaNet', frozen_stages,
            [f'patch_embed{i} + blocks{i} + norm{i}' for i in range(1, self.num_stages + 1)])
        self.norm_eval = norm_eval

        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        cur = 0
        # Module creation order = the released state-dict order: patch_embed{i}, blocks{i}, norm{i}.
        for i in range(self.num_stages):
            embed = StemConv(in_channels, dims[0]) if i == 0 else \
                ConvDownsample(dims[i - 1], dims[i])
            blocks = nn.ModuleList(
                MogaBlock(dims[i], self.arch['ffn_ratios'][i], drop=drop_rate,
                          drop_path=rates[cur + j], init_value=init_value,
                          dilations=attn_dw_dilation, channel_split=attn_channel_split,
                          attn_act_type=attn_act_type)
                for j in range(depths[i]))
            cur += depths[i]
            self.add_module(f'patch_embed{i + 1}', embed)
            self.add_module(f'blocks{i + 1}', blocks)
            self.add_module(f'norm{i + 1}', BatchNorm2d(dims[i]))
        self._freeze_stages()

    @classmethod
    def _parse_arch(cls, arch: Union[str, dict]) -> dict:
        arch = select_arch('MogaNet', arch, cls.arch_settings, cls.arch_aliases, ARCH_FIELDS)
        for field in ARCH_FIELDS:
            if not isinstance(arch[field], list) or len(arch[field]) != 4:
                raise ValueError(f'MogaNet: arch field {field} must be a list of 4 numbers, '
                                 f'got {arch[field]!r}.')
        for i, c in enumerate(arch['embed_dims']):
            if not is_int(c) or c < 1:
                raise ValueError(f'MogaNet: embed_dims[{i}]={c!r} must be a positive int.')
        return arch

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> tuple:
        check_input('MogaNet', x, self.in_channels)
        outs = []
        for i in range(self.num_stages):
            x = getattr(self, f'patch_embed{i + 1}')(x)
            for blk in getattr(self, f'blocks{i + 1}'):
                if self.with_cp[i] and self.training and x.requires_grad:
                    x = checkpoint_block(blk, x)
                else:
                    x = blk(x)
            x = getattr(self, f'norm{i + 1}')(x)
            if i in self.out_indices:
                outs.append(x.contiguous())  # NCHW-contiguous: see OverLoCK.forward
        return tuple(outs)

    # ------------------------------------------------------------------- training behaviour
    def _stage_modules(self) -> List[List[nn.Module]]:
        """The parts ``frozen_stages`` counts: each stage's patch embedding, blocks and norm."""
        return [[getattr(self, f'{name}{i}') for name in ('patch_embed', 'blocks', 'norm')]
                for i in range(1, self.num_stages + 1)]

    # -------------------------------------------------------------- optimiser (layer decay)
    @staticmethod
    def layer_id_for_decay(name: str, num_layers: int) -> int:
        """Layer id of a parameter (model-relative name) for layer-wise lr decay, as in the
        MogaNet detection release (``LearningRateDecayOptimizerConstructorMogaNet``, used by
        their MogaNet-B/L Cascade configs): stem 0, stage-1 blocks 2, stage-2 embedding and
        blocks 3, stage-3 embedding 4 and its blocks ``min(3 + j // 2, 11)``, stage 4
        ``num_layers``; everything else (stage norms, neck, heads) ``num_layers + 1``."""
        parts = name.split('.')
        if len(parts) < 3 or parts[0] != 'backbone':
            return num_layers + 1
        if parts[1].startswith('patch_embed'):
            stage = int(parts[1][len('patch_embed'):])
            return {1: 0, 2: 3, 3: 4}.get(stage, num_layers)
        if parts[1].startswith('blocks'):
            stage = int(parts[1][len('blocks'):])
            if stage in (1, 2):
                return stage + 1
            if stage == 3:
                return min(3 + int(parts[2]) // 2, 11)  # 11: a constant in the release
            return num_layers
        return num_layers + 1

    @staticmethod
    def no_weight_decay(name: str, param: torch.Tensor) -> bool:
        """MogaNet's release: no decay for biases and every tensor that is 1-D once squeezed
        (norms, layer scales, element scales, the C->1 decompose conv)."""
        return param.squeeze().dim() <= 1 or name.endswith('.bias')

    # ------------------------------------------------------------------------------ weights
    def _default_init(self) -> None:
        """The authors' ImageNet init: normal(0, sqrt(2 / fan_out)) convs, trunc-normal(0.02)
        linears, zero biases; norms 1/0 (layer and element scales keep their init values)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, (2.0 / fan_out) ** 0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, _BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def init_weights(self) -> None:
        self._default_init()
        pretrained, rest = pretrained_and_rest('MogaNet', self.init_cfg)
        if rest is not None:
            cfg, self.init_cfg = self.init_cfg, rest
            super().init_weights()
            self.init_cfg = cfg
        for c in pretrained:
            load_released_weights(self, c['checkpoint'], name='MogaNet', prefix=c.get('prefix'),
                                  map_location=c.get('map_location', 'cpu'),
                                  unused_prefixes=('head.',),
                                  logger=MMLogger.get_current_instance())
        self._is_init = True
