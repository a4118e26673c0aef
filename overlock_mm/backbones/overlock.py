"""The OverLoCK backbone (Lou & Yu, "OverLoCK: An Overview-first-Look-Closely-next ConvNet with
Context-Mixing Dynamic Kernels", CVPR 2025, arXiv 2502.20087).

Base-Net (stem + stages 1-3 of RepConvBlocks) -> Overview-Net (stage 4, stride 32, the context
prior) -> Focus-Net (DynamicConvBlocks at strides 16 and 32, guided by the prior).
Parameter names equal the authors' released checkpoints in all three layouts:

* ``'cls'``: ImageNet classification (``overlock_*_in1k_224.pth`` minus ``head``/``aux_head``,
  which live in :class:`overlock_mm.heads.OverLoCKClsHead`);
* ``'seg'``: dense pyramid with ``extra_norm`` (UperNet checkpoints);
* ``'det'``: ``'seg'`` plus the stage-4 overview fusion ``h_proj`` (Mask R-CNN checkpoints).

Variants live in :attr:`OverLoCK.arch_settings`; add one there or pass a dict.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.logging import MMLogger
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers import (BatchNorm2d, DilatedReparamBlock, DynamicConvBlock, LayerNorm2d, LayerScale,
                      RepConvBlock)
from ..layers.conv import conv_bn
from ..ops import known_impls
from ..registry import MODELS
from ..utils.activation_checkpoint import checkpoint_block
from ..utils.checkpoint import fuse_training_weights_pre_hook, load_backbone_weights
from ._checks import (check_frozen_stages, check_input, check_out_indices, per_stage_flags,
                      is_int, is_number, pretrained_and_rest, select_arch)
from ._freezing import FrozenStagesMixin

LAYOUTS = ('cls', 'seg', 'det')
ARCH_FIELDS = ('depths', 'sub_depths', 'embed_dims', 'kernel_sizes', 'num_heads', 'mlp_ratio',
               'sub_mlp_ratio')
#: what ``frozen_stages = 1 .. 5`` freezes, part by part (:meth:`OverLoCK._stage_modules`)
FROZEN_PARTS = ('stem + blocks1 (+ extra_norm.0)', 'patch_embed2 + blocks2 (+ extra_norm.1)',
                'patch_embed3 + blocks3', 'Overview-Net: patch_embed4, blocks4, high_level_proj',
                'Focus-Net: sub_blocks3, patch_embedx, sub_blocks4 (+ extra_norm.2-4, h_proj)')


def _stem(in_channels: int, dim: int) -> nn.Sequential:
    half = dim // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, half, 3, 2, 1, bias=False), BatchNorm2d(half), nn.GELU(),
        nn.Conv2d(half, half, 3, 1, 1, bias=False), BatchNorm2d(half), nn.GELU(),
        nn.Conv2d(half, dim, 3, 2, 1, bias=False), BatchNorm2d(dim), nn.GELU(),
        nn.Conv2d(dim, dim, 3, 1, 1, bias=False), BatchNorm2d(dim),
    )


class FocusDownsample(nn.Module):
    """``patch_embedx``: stride-2 downsampling of the features and of the context together."""

    def __init__(self, in_dim: int, out_dim: int, ctx_channels: int) -> None:
        super().__init__()
        self.x_proj = conv_bn(in_dim, out_dim, 3, stride=2)
        self.h_proj = conv_bn(ctx_channels, ctx_channels, 3, stride=2)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.x_proj(x), self.h_proj(ctx)


@MODELS.register_module()
class OverLoCK(FrozenStagesMixin, BaseModule):
    """OverLoCK backbone.

    Args:
        arch (str | dict): ``'xt'``, ``'t'``, ``'s'``, ``'b'`` (or ``'xtiny'``, ``'tiny'``,
            ``'small'``, ``'base'``), or a dict with the keys ``depths`` (4 ints: blocks1..4),
            ``sub_depths`` (2 ints: sub_blocks3, sub_blocks4), ``embed_dims`` (4 ints),
            ``kernel_sizes`` (4 odd ints), ``num_heads`` (2 ints, Focus-Net stages 3 and 4),
            ``mlp_ratio`` (a number or 4) and ``sub_mlp_ratio`` (a number or 2).
        layout (str): ``'cls'``, ``'seg'`` or ``'det'`` (see the module docstring).
            Defaults to ``'cls'``.
        in_channels (int): input channels. Defaults to 3.
        out_indices (int | Sequence[int], optional): outputs to return, in increasing order
            (negative ones count from the end: -1 is 4). 0-3 are the stride 4/8/16/32
            features (normalised by ``extra_norm`` in the dense layouts); 4 is the Overview-Net's
            raw stride-32 context (input of the classification aux head). Defaults to ``(3,)``
            for ``'cls'`` and ``(0, 1, 2, 3)`` otherwise.
        drop_path_rate (float): stochastic depth, rising linearly over blocks1..4, sub_blocks3,
            sub_blocks4. Defaults to 0.
        smk_size (int): small dynamic kernel size. Defaults to 5.
        ls_init_values (Sequence[float | None]): LayerScale init per stage. Defaults to
            ``(None, None, 1., 1.)``.
        frozen_stages (int): freeze (eval mode, no grad) the first ``n`` parts of
            ``[stem + blocks1 (+extra_norm.0), patch_embed2 + blocks2 (+extra_norm.1),
            patch_embed3 + blocks3, Overview-Net (patch_embed4, blocks4, high_level_proj),
            Focus-Net (everything else)]``. -1 or 0 freezes nothing. Defaults to -1.
        norm_eval (bool): keep every BatchNorm in eval mode while training. Defaults to False.
        with_cp (bool | Sequence[bool]): gradient checkpointing of the blocks, one flag or one per
            resolution (stride 4, 8, 16 (blocks3 and sub_blocks3), 32 (blocks4 and
            sub_blocks4)); BatchNorm statistics move once per step, as without it
            (:func:`~overlock_mm.utils.activation_checkpoint.checkpoint_block`). Defaults to False.
        memory_efficient (bool | Sequence[bool]): in training, recompute the cheap layers whose
            activations are large (the dilated re-parameterisation branches with their norms,
            the MLPs' GELU -> DW 3x3 -> GRN; see ``RECOMPUTE`` in ``layers/blocks.py``) in
            backward instead of keeping them: same outputs, gradients and BatchNorm statistics.
            One flag or one per resolution, as ``with_cp``. An OverLoCK-T training step at
            1344x800 on CPU peaks at 3.8 instead of 7.0 GB for 4-25 % more time; on an H200 GPU,
            where the step is bound by the host's launch work that recomputation repeats, 3.7
            instead of 6.9 GB for 1.1-1.4x the time, and ``(True, True, False, False)`` 5.3 GB
            for ~1.15x (docs/performance.md). Blocks that ``with_cp`` checkpoints whole do not
            also do this. Defaults to True; False for the fastest step when memory is
            plentiful.
        deploy (bool): build the re-parameterised network directly (for ``*_reparam.pth``).
            Defaults to False.
        contmix_impl (str): ContMix aggregation implementation, ``'auto'`` picks the fastest
            for the device; ``'reference'`` forces the ``F.unfold`` formulation.
        init_cfg (dict | list[dict], optional): e.g. ``dict(type='Pretrained', checkpoint=...)``
            with an authors' ImageNet, COCO or ADE20K checkpoint or one of ours.
    """

    arch_settings: Dict[str, dict] = {
        'xt': dict(depths=[2, 2, 3, 2], sub_depths=[6, 2], embed_dims=[56, 112, 256, 336],
                   kernel_sizes=[17, 15, 13, 7], num_heads=[4, 6], mlp_ratio=4, sub_mlp_ratio=3),
        't': dict(depths=[4, 4, 6, 2], sub_depths=[12, 2], embed_dims=[64, 128, 256, 512],
                  kernel_sizes=[17, 15, 13, 7], num_heads=[4, 8], mlp_ratio=4, sub_mlp_ratio=3),
        's': dict(depths=[6, 6, 8, 3], sub_depths=[16, 3], embed_dims=[64, 128, 320, 512],
                  kernel_sizes=[17, 15, 13, 7], num_heads=[8, 16], mlp_ratio=4, sub_mlp_ratio=3),
        'b': dict(depths=[8, 8, 10, 4], sub_depths=[20, 4], embed_dims=[80, 160, 384, 576],
                  kernel_sizes=[17, 15, 13, 7], num_heads=[6, 9], mlp_ratio=4, sub_mlp_ratio=3),
    }
    arch_aliases = {'xtiny': 'xt', 'tiny': 't', 'small': 's', 'base': 'b'}
    #: outputs ``out_indices`` selects from: 0-3 the stride 4/8/16/32 features (2 and 3 with the
    #: context channels appended), 4 the Overview-Net's stride-32 context.
    num_out_levels = 5

    def __init__(self,
                 arch: Union[str, dict] = 't',
                 layout: str = 'cls',
                 in_channels: int = 3,
                 out_indices: Optional[Sequence[int]] = None,
                 drop_path_rate: float = 0.,
                 smk_size: int = 5,
                 ls_init_values: Sequence[Optional[float]] = (None, None, 1., 1.),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: Union[bool, Sequence[bool]] = False,
                 deploy: bool = False,
                 contmix_impl: str = 'auto',
                 memory_efficient: Union[bool, Sequence[bool]] = True,
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.arch = self._parse_arch(arch)
        if layout not in LAYOUTS:
            raise ValueError(f"OverLoCK: unknown layout '{layout}'; valid layouts: "
                             f"{', '.join(LAYOUTS)} (classification, segmentation, detection).")
        self.layout = layout
        self.in_channels = in_channels
        depths, sub_depths = self.arch['depths'], self.arch['sub_depths']
        dims, kernels = self.arch['embed_dims'], self.arch['kernel_sizes']
        heads = self.arch['num_heads']
        self.embed_dims = list(dims)
        ctx = dims[3] // 4
        self.ctx_channels = ctx
        #: output channels of out_indices 0..4.
        self.out_channels = [dims[0], dims[1], dims[2] + ctx, dims[3] + ctx, dims[3]]

        if out_indices is None:
            out_indices = (3,) if layout == 'cls' else (0, 1, 2, 3)
        self.out_indices = check_out_indices(
            'OverLoCK', out_indices, self.num_out_levels,
            '0-3: stride 4/8/16/32 features, 4: the overview context')

        # Stages 3 and 4 also feed the Focus-Net blocks, whose LayerScales always exist.
        if not isinstance(ls_init_values, (list, tuple)) or len(ls_init_values) != 4 or not all(
                is_number(v) or (v is None and i < 2) for i, v in enumerate(ls_init_values)):
            raise ValueError(f'OverLoCK: ls_init_values needs 4 entries (one per stage): None (no '
                             f'LayerScale) or a number for stages 1-2, a number for stages 3-4 '
                             f'(the Focus-Net blocks always have one), got {ls_init_values!r}.')
        # DynamicConvBlock resizes maps smaller than the large kernel up to it, so a small kernel
        # no larger than the large one always fits.
        large = min(kernels[2], kernels[3])
        if not is_int(smk_size) or smk_size < 1 or smk_size % 2 == 0 or smk_size > large:
            raise ValueError(f'OverLoCK: smk_size={smk_size!r} must be an odd int from 1 to '
                             f'{large} (the smaller Focus-Net kernel size, kernel_sizes[2:]).')
        if contmix_impl not in known_impls():
            raise ValueError(f"OverLoCK: unknown contmix_impl {contmix_impl!r}; valid: "
                             f"{', '.join(repr(i) for i in known_impls())}.")
        self.with_cp = per_stage_flags('OverLoCK', 'with_cp', with_cp)
        self.frozen_stages = check_frozen_stages('OverLoCK', frozen_stages, FROZEN_PARTS)
        self.norm_eval = norm_eval
        self.drop_path_rate = drop_path_rate
        self.deploy = deploy
        self.memory_efficient = per_stage_flags('OverLoCK', 'memory_efficient',
                                                memory_efficient)
        # Selective recomputation inside a block that is checkpointed whole would run it a third
        # time in backward and keep nothing less.
        lean = [me and not cp for me, cp in zip(self.memory_efficient, self.with_cp)]

        total = sum(depths) + sum(sub_depths)
        rates = iter([drop_path_rate * i / max(total - 1, 1) for i in range(total)])

        # Module creation order = the released state-dict order.
        self.patch_embed1 = _stem(in_channels, dims[0])
        self.patch_embed2 = conv_bn(dims[0], dims[1], 3, stride=2)
        self.patch_embed3 = conv_bn(dims[1], dims[2], 3, stride=2)
        self.patch_embed4 = conv_bn(dims[2], dims[3], 3, stride=2)
        self.high_level_proj = nn.Conv2d(dims[3], ctx, 1)
        self.patch_embedx = FocusDownsample(dims[2], dims[3], ctx)
        for i in range(4):
            blocks = nn.ModuleList(
                RepConvBlock(dims[i], kernels[i], self.arch['mlp_ratio'][i], ls_init_values[i],
                             next(rates), deploy=deploy, memory_efficient=lean[i])
                for _ in range(depths[i]))
            self.add_module(f'blocks{i + 1}', blocks)
        for s, stage in enumerate((2, 3)):
            n = sub_depths[s]
            blocks = nn.ModuleList(
                DynamicConvBlock(dims[stage], dims[3], kernels[stage], smk_size, heads[s],
                                 self.arch['sub_mlp_ratio'][s], ls_init_values[stage], next(rates),
                                 is_first=(stage == 2 and j == 0),
                                 is_last=(stage == 3 and j == n - 1),
                                 deploy=deploy, contmix_impl=contmix_impl,
                                 memory_efficient=lean[stage])
                for j in range(n))
            self.add_module(f'sub_blocks{stage + 1}', blocks)
        if layout == 'det':
            self.h_proj = nn.Sequential(nn.Conv2d(dims[3], dims[3] + ctx, 1),
                                        LayerScale(dims[3] + ctx, 1e-5))
        if layout != 'cls':
            norms = [LayerNorm2d(c) for c in self.out_channels[:4]]
            if layout == 'det':
                norms.append(LayerNorm2d(dims[3]))
            self.extra_norm = nn.ModuleList(norms)
        self._freeze_stages()
        # A deploy model fuses training-form weights however they arrive (load_from, EMA...).
        self.register_load_state_dict_pre_hook(fuse_training_weights_pre_hook)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def _parse_arch(cls, arch: Union[str, dict]) -> dict:
        arch = select_arch('OverLoCK', arch, cls.arch_settings, cls.arch_aliases, ARCH_FIELDS)
        for field, n in (('mlp_ratio', 4), ('sub_mlp_ratio', 2)):
            if isinstance(arch[field], (int, float)):
                arch[field] = [arch[field]] * n  # one ratio for every stage
        for field, n in (('depths', 4), ('sub_depths', 2), ('embed_dims', 4), ('kernel_sizes', 4),
                         ('num_heads', 2), ('mlp_ratio', 4), ('sub_mlp_ratio', 2)):
            value = arch[field]
            positive = is_number if 'ratio' in field else is_int
            if not isinstance(value, list) or len(value) != n or \
                    not all(positive(v) and v > 0 for v in value):
                kind = 'positive numbers' if 'ratio' in field else 'positive ints'
                raise ValueError(f'OverLoCK: arch field {field} must be a list of {n} {kind}, '
                                 f'got {value!r}.')
        dims, heads = arch['embed_dims'], arch['num_heads']
        if dims[0] % 2:
            raise ValueError(f'OverLoCK: embed_dims[0]={dims[0]} must be even (the stem halves '
                             'it).')
        if dims[3] % 4:
            raise ValueError(f'OverLoCK: embed_dims[3]={dims[3]} must be divisible by 4 '
                             '(the context prior has embed_dims[3] // 4 channels).')
        for s, stage in enumerate((2, 3)):
            # ContMix splits C into 2 kernels x 2h groups, and the query into 2h groups.
            if dims[stage] % (4 * heads[s]):
                raise ValueError(f'OverLoCK: embed_dims[{stage}]={dims[stage]} must be divisible '
                                 f'by 4 * num_heads[{s}] = {4 * heads[s]} (2 dynamic kernels x '
                                 f'2 * num_heads groups).')
        for k in arch['kernel_sizes']:
            if k not in DilatedReparamBlock.valid_kernel_sizes():
                raise ValueError(f'OverLoCK: arch field kernel_sizes has {k}; valid kernel sizes: '
                                 f'{DilatedReparamBlock.valid_kernel_sizes()}.')
        return arch

    # ----------------------------------------------------------------------------- forward
    def _run(self, blocks: nn.ModuleList, use_cp: bool, *args):
        for blk in blocks:
            if use_cp and self.training and torch.is_grad_enabled():
                out = checkpoint_block(blk, *args)
            else:
                out = blk(*args)
            if isinstance(blk, DynamicConvBlock):
                args = (*out, args[2])
            else:
                args = (out,)
        return args

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        check_input('OverLoCK', x, self.in_channels)
        dense = self.layout != 'cls'
        outs = {}
        x = self.patch_embed1(x)
        (x,) = self._run(self.blocks1, self.with_cp[0], x)
        outs[0] = self.extra_norm[0](x) if dense else x
        x = self.patch_embed2(x)
        (x,) = self._run(self.blocks2, self.with_cp[1], x)
        if dense:
            # The released dense models feed the *normalised* stride-8 map to stage 3.
            x = self.extra_norm[1](x)
        outs[1] = x
        x = self.patch_embed3(x)
        (x,) = self._run(self.blocks3, self.with_cp[2], x)

        # Overview-Net: a coarse look at the whole image gives the context prior.
        ctx = self.patch_embed4(x)
        (ctx,) = self._run(self.blocks4, self.with_cp[3], ctx)
        overview = ctx
        prior = self.high_level_proj(ctx)
        prior_up = F.interpolate(prior, size=x.shape[2:], mode='bilinear', align_corners=False)

        # Focus-Net: dynamic blocks guided by the prior, which is re-injected in every block.
        x, ctx, _ = self._run(self.sub_blocks3, self.with_cp[2], x, prior_up, prior_up)
        if 2 in self.out_indices:
            out2 = torch.cat([x, ctx], dim=1)
            outs[2] = self.extra_norm[2](out2) if dense else out2
        x, ctx = self.patch_embedx(x, ctx)
        x, _, _ = self._run(self.sub_blocks4, self.with_cp[3], x, ctx, prior)
        if dense:
            x = self.extra_norm[3](x)
            if self.layout == 'det':
                x = x + self.h_proj(self.extra_norm[4](overview))
        outs[3] = x
        outs[4] = overview
        # NCHW-contiguous outputs: LayerNorm2d's permutes leave channels-last strides behind, and
        # consumers that read raw memory (mmcv's RoIAlign, CPU and CUDA) silently misread those
        return tuple(outs[i].contiguous() for i in self.out_indices)

    # ------------------------------------------------------------------- training behaviour
    def _stage_modules(self) -> List[List[nn.Module]]:
        """The parts ``frozen_stages`` counts, in forward order."""
        norms = list(self.extra_norm) if hasattr(self, 'extra_norm') else []
        parts = [[self.patch_embed1, self.blocks1], [self.patch_embed2, self.blocks2],
                 [self.patch_embed3, self.blocks3],
                 [self.patch_embed4, self.blocks4, self.high_level_proj],
                 [self.sub_blocks3, self.patch_embedx, self.sub_blocks4]]
        if norms:
            parts[0].append(norms[0])
            parts[1].append(norms[1])
            parts[4].extend(norms[2:])
        if hasattr(self, 'h_proj'):
            parts[4].append(self.h_proj)
        return parts

    def switch_to_deploy(self) -> None:
        """Fuse every DilatedReparamBlock into one large-kernel conv (``*_reparam.pth`` layout)."""
        for m in self.modules():
            if isinstance(m, DilatedReparamBlock):
                m.switch_to_deploy()
        self.deploy = True
        self._freeze_stages()  # the fused convs are new parameters: frozen stages stay frozen

    # ------------------------------------------------------------------------------ weights
    def _default_init(self) -> None:
        """Released training init: trunc-normal(0.02) convs/linears, zero biases; norms 1/0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, _BatchNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # LayerScale / GRN / rpb keep their constructor values (init value, zeros).

    def init_weights(self) -> None:
        self._default_init()
        pretrained, rest = pretrained_and_rest('OverLoCK', self.init_cfg)
        if rest is not None:
            cfg, self.init_cfg = self.init_cfg, rest
            super().init_weights()
            self.init_cfg = cfg
        for c in pretrained:
            load_backbone_weights(self, c['checkpoint'], prefix=c.get('prefix'),
                                  map_location=c.get('map_location', 'cpu'),
                                  logger=MMLogger.get_current_instance())
        self._is_init = True
