"""The UniRepLKNet backbone (Ding et al., "UniRepLKNet: A Universal Perception Large-Kernel
ConvNet for Audio, Video, Point Cloud, Time-Series and Image Recognition", CVPR 2024,
arXiv 2311.15599) for mmdet / mmseg / mmpretrain, as a baseline next to OverLoCK.

ConvNeXt-style macro design: a stem of two stride-2 3x3 convs (channels-first LayerNorm, GELU
between), stride-2 3x3 conv + LayerNorm downsampling, four stages of
:class:`~overlock_mm.layers.unirep.UniRepLKNetBlock`: 3x3 blocks in stage 1, 13x13 dilated
re-param blocks in stages 2 and 4, and in stage 3 a 13x13 block followed by 3x3 blocks (every
block for A/F/P/N, every 2nd for T, every 3rd for S/B/L/XL).

Sources: widths, depths and kernel-size patterns are the paper's (Sec. 4 / Table 11) and agree
with the released checkpoints (``tests/data/baseline_keys/unireplknet_*_cls.tsv``), which also
give every parameter name. Two layouts:

* ``'cls'``: the ImageNet classifier minus its ``head``: a final ``norm`` (LayerNorm) over the
  globally pooled stride-32 features; the backbone returns that pooled, normalised vector.
* ``'dense'``: the layout of the authors' mmdet/mmseg backbone (``UniRepLKNetBackbone``): one
  channels-first LayerNorm per stage output, ``norm0`` .. ``norm3`` (in their plugin code, not in
  the TSVs). Loading ImageNet weights leaves ``norm``/``head`` unused and initialises ``norm{i}``.

``deploy=True`` builds the re-parameterised network (``*_deploy`` configs of the release);
:meth:`UniRepLKNet.switch_to_deploy` converts a trained one, and training-form checkpoints
load into a deploy network by fusing on the fly, by any route (``init_cfg``, ``load_from``,
``load_state_dict``: a load pre-hook, :func:`_fuse_training_form`).
"""
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from mmengine.logging import MMLogger
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers.norm import LayerNorm2d
from ..layers.unirep import PLAIN_KERNELS, UNIREPLKNET_BRANCHES, UniRepLKNetBlock
from ..registry import MODELS
from ..utils.activation_checkpoint import checkpoint_block
from ..utils.checkpoint import is_reparameterized, rewrite_under_prefix
from ._baseline_utils import load_released_weights
from ._checks import (check_frozen_stages, check_input, check_out_indices, per_stage_flags,
                      pretrained_and_rest, select_arch)
from ._freezing import FrozenStagesMixin

LAYOUTS = ('cls', 'dense')
ARCH_FIELDS = ('depths', 'dims')
ARCH_OPTIONAL = ('kernel_sizes',)

#: ImageNet-1K weights released by the authors (Hugging Face DingXiaoH/UniRepLKNet; file names
#: from their model zoo). Classification layout, training form.
RELEASED_IN1K = {
    arch: 'https://huggingface.co/DingXiaoH/UniRepLKNet/resolve/main/'
          f'unireplknet_{arch}_in1k_224_acc{acc}.pth'
    for arch, acc in (('a', '77.03'), ('f', '78.58'), ('p', '80.23'), ('n', '81.64'),
                      ('t', '83.21'), ('s', '83.91'))
}


def _stage3_pattern(depth: int, every: int) -> List[int]:
    return [13 if j % every == 0 else 3 for j in range(depth)]


def default_kernel_sizes(depths: Sequence[int]) -> List[List[int]]:
    """The release's default kernel sizes for the known depth patterns (else ValueError)."""
    depths = tuple(depths)
    every = {(2, 2, 6, 2): 1, (2, 2, 8, 2): 1, (3, 3, 18, 3): 2, (3, 3, 27, 3): 3}.get(depths)
    if every is None:
        raise ValueError(f'UniRepLKNet: no default kernel sizes for depths {list(depths)} (known: '
                         '[2, 2, 6, 2], [2, 2, 8, 2], [3, 3, 18, 3], [3, 3, 27, 3]); give '
                         'kernel_sizes (4 lists, one size per block) in the arch dict.')
    return [[3] * depths[0], [13] * depths[1], _stage3_pattern(depths[2], every),
            [13] * depths[3]]


def _fuse_training_form(module: 'UniRepLKNet', state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook: training-form weights (BNs, dilated branches, GRN bias,
    layer scale) arriving at a re-parameterised (``deploy``) UniRepLKNet are fused in place,
    with the network's own :meth:`UniRepLKNet.switch_to_deploy`."""
    if module.deploy:  # _training_form_to_deploy returns a deploy-form dict as it is
        rewrite_under_prefix(state_dict, prefix, module._training_form_to_deploy)


@MODELS.register_module()
class UniRepLKNet(FrozenStagesMixin, BaseModule):
    """UniRepLKNet backbone.

    Args:
        arch (str | dict): ``'a'``, ``'f'``, ``'p'``, ``'n'``, ``'t'``, ``'s'``, ``'b'``, ``'l'``,
            ``'xl'`` (or ``'atto'``, ``'femto'``, ``'pico'``, ``'nano'``, ``'tiny'``,
            ``'small'``, ``'base'``, ``'large'``, ``'xlarge'``), or a dict with ``depths`` and
            ``dims`` (4 ints each) and optionally ``kernel_sizes`` (4 lists, one size per
            block). Defaults to ``'t'``.
        layout (str): ``'dense'`` (per-stage LayerNorms ``norm0-3``, mmdet/mmseg) or ``'cls'``
            (final ``norm`` after global pooling). Defaults to ``'dense'``.
        in_channels (int): input channels. Defaults to 3.
        out_indices (Sequence[int] | int, optional): ``'dense'``: stages 0-3 (strides
            4/8/16/32), default all; ``'cls'``: only 3 (the pooled vector).
        drop_path_rate (float): stochastic depth, rising linearly over the blocks. Defaults to 0.
        layer_scale_init_value (float): init of the blocks' ``gamma``. Defaults to 1e-6.
        frozen_stages (int): freeze (eval mode, no grad) stages ``0 .. frozen_stages - 1``
            (downsampling layer, blocks and, in ``'dense'``, the stage norm). -1 or 0 freezes
            nothing. Defaults to -1.
        norm_eval (bool): keep every BatchNorm in eval mode while training. Defaults to False.
        with_cp (bool | Sequence[bool]): gradient checkpointing of the blocks, one flag or one
            per stage; BatchNorm statistics move once per step, as without it
            (:func:`~overlock_mm.utils.activation_checkpoint.checkpoint_block`). Defaults to False.
        deploy (bool): build the re-parameterised network directly. Defaults to False.
        init_cfg (dict | list[dict], optional): e.g. ``dict(type='Pretrained',
            checkpoint=RELEASED_IN1K['t'])``; ImageNet checkpoints (training form) load into both
            layouts and into ``deploy=True`` networks; mmdet/mmseg checkpoints too.
    """

    arch_settings: Dict[str, dict] = {
        'a': dict(depths=[2, 2, 6, 2], dims=[40, 80, 160, 320]),
        'f': dict(depths=[2, 2, 6, 2], dims=[48, 96, 192, 384]),
        'p': dict(depths=[2, 2, 6, 2], dims=[64, 128, 256, 512]),
        'n': dict(depths=[2, 2, 8, 2], dims=[80, 160, 320, 640]),
        't': dict(depths=[3, 3, 18, 3], dims=[80, 160, 320, 640]),
        's': dict(depths=[3, 3, 27, 3], dims=[96, 192, 384, 768]),
        'b': dict(depths=[3, 3, 27, 3], dims=[128, 256, 512, 1024]),
        'l': dict(depths=[3, 3, 27, 3], dims=[192, 384, 768, 1536]),
        'xl': dict(depths=[3, 3, 27, 3], dims=[256, 512, 1024, 2048]),
    }
    arch_aliases = {'atto': 'a', 'femto': 'f', 'pico': 'p', 'nano': 'n', 'tiny': 't',
                    'small': 's', 'base': 'b', 'large': 'l', 'xlarge': 'xl'}
    num_stages = 4

    def __init__(self,
                 arch: Union[str, dict] = 't',
                 layout: str = 'dense',
                 in_channels: int = 3,
                 out_indices: Optional[Union[int, Sequence[int]]] = None,
                 drop_path_rate: float = 0.,
                 layer_scale_init_value: float = 1e-6,
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: Union[bool, Sequence[bool]] = False,
                 deploy: bool = False,
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.arch = self._parse_arch(arch)
        if layout not in LAYOUTS:
            raise ValueError(f"UniRepLKNet: unknown layout '{layout}'; valid layouts: "
                             f"{', '.join(LAYOUTS)} (classification, detection/segmentation).")
        self.layout = layout
        depths, dims = self.arch['depths'], self.arch['dims']
        self.dims = list(dims)
        self.out_channels = list(dims)
        self.in_channels = in_channels
        if layout == 'cls':
            out_indices = (3,) if out_indices is None else out_indices
            self.out_indices = check_out_indices('UniRepLKNet', out_indices, self.num_stages,
                                                 'stages at strides 4/8/16/32')
            if self.out_indices != (3,):
                raise ValueError(f"UniRepLKNet: layout 'cls' only outputs the pooled stage-3 "
                                 f"features (out_indices=(3,)), got {out_indices}; use layout "
                                 "'dense' for a feature pyramid.")
        else:
            out_indices = (0, 1, 2, 3) if out_indices is None else out_indices
            self.out_indices = check_out_indices('UniRepLKNet', out_indices, self.num_stages,
                                                 'stages at strides 4/8/16/32')
        self.with_cp = per_stage_flags('UniRepLKNet', 'with_cp', with_cp, self.num_stages)
        self.frozen_stages = check_frozen_stages(
            'UniRepLKNet', frozen_stages,
            [f'downsample_layers.{i} + stages.{i}' + (f' + norm{i}' if layout == 'dense' else '')
             for i in range(self.num_stages)])
        self.norm_eval = norm_eval
        self.deploy = deploy
        self.drop_path_rate = drop_path_rate
        self.layer_scale_init_value = layer_scale_init_value

        # Module creation order = the released state-dict order.
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(in_channels, dims[0] // 2, 3, 2, 1), LayerNorm2d(dims[0] // 2), nn.GELU(),
            nn.Conv2d(dims[0] // 2, dims[0], 3, 2, 1), LayerNorm2d(dims[0]))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                nn.Conv2d(dims[i], dims[i + 1], 3, 2, 1), LayerNorm2d(dims[i + 1])))
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.stages = nn.ModuleList()
        cur = 0
        for i in range(self.num_stages):
            self.stages.append(nn.Sequential(*[
                UniRepLKNetBlock(dims[i], self.arch['kernel_sizes'][i][j], rates[cur + j],
                                 layer_scale_init_value, deploy=deploy)
                for j in range(depths[i])]))
            cur += depths[i]
        if layout == 'cls':
            self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        else:
            for i in range(self.num_stages):
                self.add_module(f'norm{i}', LayerNorm2d(dims[i]))
        self._freeze_stages()
        # A deploy network fuses training-form weights however they arrive (load_from, EMA...).
        self.register_load_state_dict_pre_hook(_fuse_training_form)

    @classmethod
    def _parse_arch(cls, arch: Union[str, dict]) -> dict:
        arch = select_arch('UniRepLKNet', arch, cls.arch_settings, cls.arch_aliases, ARCH_FIELDS,
                           ARCH_OPTIONAL)
        out = {k: arch[k] for k in ARCH_FIELDS}
        for field in ARCH_FIELDS:
            if not isinstance(out[field], list) or len(out[field]) != 4 or \
                    not all(isinstance(v, int) and v > 0 for v in out[field]):
                raise ValueError(f'UniRepLKNet: arch field {field} must be a list of 4 positive '
                                 f'ints, got {arch[field]!r}.')
        for i, c in enumerate(out['dims']):
            if c % 4:
                raise ValueError(f'UniRepLKNet: dims[{i}]={c} must be divisible by 4 (the SE '
                                 'squeezes C to C // 4).')
        kernels = arch.get('kernel_sizes')
        kernels = default_kernel_sizes(out['depths']) if kernels is None else \
            [list(k) for k in kernels]
        valid = sorted(PLAIN_KERNELS + tuple(UNIREPLKNET_BRANCHES))
        if len(kernels) != 4 or any(len(k) != d for k, d in zip(kernels, out['depths'])):
            raise ValueError(f'UniRepLKNet: arch field kernel_sizes needs 4 lists with one size '
                             f'per block (depths {out["depths"]}), got {kernels!r}.')
        for k in (k for stage in kernels for k in stage):
            if k not in valid:
                raise ValueError(f'UniRepLKNet: arch field kernel_sizes has {k!r}; valid kernel '
                                 f'sizes: {valid}.')
        out['kernel_sizes'] = kernels
        return out

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> tuple:
        check_input('UniRepLKNet', x, self.in_channels)
        outs = []
        for i in range(self.num_stages):
            x = self.downsample_layers[i](x)
            for blk in self.stages[i]:
                if self.with_cp[i] and self.training and x.requires_grad:
                    x = checkpoint_block(blk, x)
                else:
                    x = blk(x)
            if self.layout == 'dense' and i in self.out_indices:
                # NCHW-contiguous: see OverLoCK.forward
                outs.append(getattr(self, f'norm{i}')(x).contiguous())
        if self.layout == 'cls':
            outs.append(self.norm(x.mean(dim=(-2, -1))))
        return tuple(outs)

    # ------------------------------------------------------------------- training behaviour
    def _stage_modules(self) -> List[List[nn.Module]]:
        """The parts ``frozen_stages`` counts: each stage's downsampling, blocks and (dense
        layout) output norm."""
        return [[self.downsample_layers[i], self.stages[i]]
                + ([getattr(self, f'norm{i}')] if self.layout == 'dense' else [])
                for i in range(self.num_stages)]

    def switch_to_deploy(self) -> None:
        """Re-parameterise every block (eval-mode BN statistics): dilated branches, BNs, the GRN
        bias and the layer scale fold into the convolutions / last linear layer."""
        for m in self.modules():
            if isinstance(m, UniRepLKNetBlock):
                m.switch_to_deploy()
        self.deploy = True
        self._freeze_stages()  # the fused convs are new parameters: frozen stages stay frozen

    # -------------------------------------------------------------- optimiser (layer decay)
    @staticmethod
    def layer_id_for_decay(name: str, num_layers: int) -> int:
        """Layer id for layer-wise lr decay, as in the UniRepLKNet release
        (``UniRepLKNetLearningRateDecayOptimizerConstructor``, ConvNeXt's numbering): stem 0,
        stage-1 blocks 1, stage 2 (downsampling and blocks) 2, stage-3 downsampling 3 and its
        blocks ``3 + j // 3``, stage 4 ``num_layers``; everything else ``num_layers + 1``."""
        parts = name.split('.')
        if len(parts) < 4 or parts[0] != 'backbone':
            return num_layers + 1
        if parts[1] == 'downsample_layers':
            return {0: 0, 1: 2, 2: 3}.get(int(parts[2]), num_layers)
        if parts[1] == 'stages':
            stage, block = int(parts[2]), int(parts[3])
            return {0: 1, 1: 2}.get(stage, 3 + block // 3 if stage == 2 else num_layers)
        return num_layers + 1

    @staticmethod
    def no_weight_decay(name: str, param: torch.Tensor) -> bool:
        """UniRepLKNet's release: no decay for biases and 1-D tensors (norms, ``gamma``)."""
        return param.dim() == 1 or name.endswith('.bias')

    # ------------------------------------------------------------------------------ weights
    def _default_init(self) -> None:
        """The authors' ImageNet init: trunc-normal(0.02) convs and linears, zero biases; norms
        1/0; GRN zeros and layer scales keep their constructor values."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, _BatchNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _training_form_to_deploy(self, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Fuse a training-form state dict into this (deploy) network's layout."""
        if is_reparameterized(sd) or not any(k.endswith('.norm.running_var') for k in sd):
            return sd
        with torch.device('cpu'):
            twin = UniRepLKNet(self.arch, layout=self.layout, in_channels=self.in_channels,
                               out_indices=self.out_indices,
                               layer_scale_init_value=self.layer_scale_init_value)
        own = twin.state_dict()
        twin.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
        twin.eval()
        twin.switch_to_deploy()

        def unit(key: str) -> str:
            # a block's fused tensors (deploy-only names among them) stand for its training-form
            # tensors; every other tensor is named alike in both forms
            parts = key.split('.')
            return '.'.join(parts[:3]) + '.' if parts[0] == 'stages' else key

        given = {unit(k) for k in sd}
        # Only what the state dict brought: a partial load (load_from with strict=False) must not
        # overwrite other blocks with the twin's fresh values, and keys the checkpoint lacked
        # (e.g. dense norms) stay out, so they are reported as fresh.
        fused = OrderedDict((k, v) for k, v in twin.state_dict().items() if unit(k) in given)
        fused.update({k: v for k, v in sd.items() if k not in own})  # report unused keys
        return fused

    def init_weights(self) -> None:
        self._default_init()
        pretrained, rest = pretrained_and_rest('UniRepLKNet', self.init_cfg)
        if rest is not None:
            cfg, self.init_cfg = self.init_cfg, rest
            super().init_weights()
            self.init_cfg = cfg
        fresh = ('norm0.', 'norm1.', 'norm2.', 'norm3.') if self.layout == 'dense' else ()
        for c in pretrained:
            load_released_weights(
                self, c['checkpoint'], name='UniRepLKNet', prefix=c.get('prefix'),
                map_location=c.get('map_location', 'cpu'),
                unused_prefixes=('head.', 'norm.'), fresh_prefixes=fresh,
                to_model_form=self._training_form_to_deploy if self.deploy else None,
                logger=MMLogger.get_current_instance())
        self._is_init = True
