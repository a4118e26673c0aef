"""Shared plumbing of the baseline backbones (MogaNet, UniRepLKNet): loading the authors'
released weights and their layer-wise learning-rate decay.

* :func:`load_released_weights` reads a checkpoint safely (``weights_only``, via
  :mod:`overlock_mm.utils.checkpoint`), unwraps ``state_dict``/``model`` containers and the
  ``backbone.`` prefix of mmdet/mmseg checkpoints, and loads it strictly except for the keys the
  caller declares unused (classifier heads) or freshly initialised (dense-only norms).
* :class:`BackboneLayerDecayOptimWrapperConstructor` reproduces the authors' layer-wise lr decay
  constructors for any backbone that implements ``layer_id_for_decay`` and ``no_weight_decay``.
"""
import json
from typing import Callable, Iterable, List, Optional, Tuple

import torch.nn as nn
from mmengine.dist import get_dist_info
from mmengine.logging import MMLogger
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

from ..utils.checkpoint import CheckpointError, extract_state_dict, read_checkpoint, strip_prefix


def load_released_weights(model: nn.Module, filename: str, *, name: str,
                          prefix: Optional[str] = None, map_location='cpu',
                          unused_prefixes: Iterable[str] = (),
                          fresh_prefixes: Iterable[str] = (),
                          to_model_form: Optional[Callable[[dict], dict]] = None,
                          logger=None) -> Tuple[List[str], List[str]]:
    """Load an authors' checkpoint (ImageNet, or an mmdet/mmseg one) into a baseline backbone.

    Args:
        model: the backbone.
        filename: local path or URL.
        name: model name for messages (e.g. ``'MogaNet-S'``).
        prefix: keep only the keys under this prefix (auto: ``'backbone.'`` when present).
        map_location: ``torch.load`` map location.
        unused_prefixes: checkpoint keys expected not to fit the backbone (classifier heads).
        fresh_prefixes: backbone keys allowed to be missing from the checkpoint (they keep their
            initialisation, e.g. the dense-only output norms).
        to_model_form: converts the cleaned state dict before loading (e.g. training form ->
            re-parameterised form).
        logger: where to report what was loaded; None for silence.

    Returns:
        (checkpoint keys not used, backbone keys newly initialised)

    Raises:
        CheckpointError: unreadable file, shape mismatches, or missing backbone tensors.
    """
    sd = extract_state_dict(read_checkpoint(filename, map_location))
    if prefix is None and any(k.startswith('backbone.') for k in sd):
        prefix = 'backbone.'
    sd = strip_prefix(sd, prefix)
    if to_model_form is not None:
        sd = to_model_form(sd)
    own = model.state_dict()
    mismatched = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
                  for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise CheckpointError(f'{filename!r} does not fit {name}: {len(mismatched)} shape '
                              f'mismatches, e.g. {mismatched[0]}. Is the arch right?')
    unused = [k for k in sd if k not in own]
    fresh_prefixes, unused_prefixes = tuple(fresh_prefixes), tuple(unused_prefixes)
    missing = [k for k in own if k not in sd]
    fresh = [k for k in missing if fresh_prefixes and k.startswith(fresh_prefixes)]
    lost = [k for k in missing if k not in fresh]
    if lost:
        raise CheckpointError(f'{filename!r} lacks {len(lost)} tensors of {name}, e.g. '
                              f'{lost[:3]}; it is not a checkpoint of this arch/layout (pass '
                              "prefix= if the backbone keys sit under a prefix other than "
                              "'backbone.').")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    if logger is not None:
        logger.info(f'{name}: loaded {len(sd) - len(unused)} tensors from {filename}.')
        if unused:
            groups = sorted({k.split('.')[0] for k in unused})
            expected = all(unused_prefixes and k.startswith(unused_prefixes) for k in unused)
            logger.info(f'{name}: {len(unused)} checkpoint tensors unused (modules: '
                        f'{", ".join(groups)})' +
                        (': classifier parts, not part of the backbone.' if expected else '.'))
        if fresh:
            groups = sorted({k.split('.')[0] for k in fresh})
            logger.info(f'{name}: newly initialised (absent from the checkpoint): '
                        f'{", ".join(groups)}.')
    return unused, fresh


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class BackboneLayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """Layer-wise learning-rate decay driven by the backbone's own layer numbering.

    The lr of a parameter with layer id ``i`` is ``lr * decay_rate ** (num_layers + 1 - i)``
    (ids ``0 .. num_layers + 1``; the necks and heads get ``num_layers + 1``, scale 1), and its
    weight decay is 0 where ``backbone.no_weight_decay(name, param)`` says so -- the rule of the
    MogaNet and UniRepLKNet detection/segmentation releases, whose constructors derive from
    ConvNeXt's. ``paramwise_cfg`` keys: ``num_layers`` (int), ``decay_rate`` (float),
    ``decay_type`` (only ``'layer_wise'``).

    The model's backbone must provide ``layer_id_for_decay(name: str, num_layers: int) -> int``
    (``name`` relative to the model, e.g. ``'backbone.blocks3.4.mlp.fc1.weight'``) and
    ``no_weight_decay(name: str, param: Tensor) -> bool``.
    """

    def add_params(self, params: List[dict], module: nn.Module, **kwargs) -> None:
        cfg = self.paramwise_cfg
        unknown = sorted(set(cfg) - {'num_layers', 'decay_rate', 'decay_type'})
        if unknown:
            # DefaultOptimWrapperConstructor's keys (custom_keys, bias_decay_mult...) would be
            # ignored here without a word: this constructor replaces its add_params
            raise ValueError(f'BackboneLayerDecayOptimWrapperConstructor: paramwise_cfg keys '
                             f'{unknown} are not supported (valid: num_layers, decay_rate, '
                             "decay_type); weight decay follows the backbone's no_weight_decay().")
        if 'num_layers' not in cfg or 'decay_rate' not in cfg:
            raise ValueError('BackboneLayerDecayOptimWrapperConstructor needs paramwise_cfg with '
                             f'num_layers and decay_rate, got {dict(cfg)}.')
        if cfg.get('decay_type', 'layer_wise') != 'layer_wise':
            raise ValueError(f"BackboneLayerDecayOptimWrapperConstructor: decay_type "
                             f"{cfg.get('decay_type')!r} is not supported (only 'layer_wise').")
        backbone = getattr(module, 'backbone', None)
        if not hasattr(backbone, 'layer_id_for_decay'):
            raise TypeError('BackboneLayerDecayOptimWrapperConstructor: the model has no backbone '
                            'with layer_id_for_decay() (MogaNet and UniRepLKNet have one); got '
                            f'{type(backbone).__name__}.')
        num_layers = int(cfg['num_layers'])
        decay_rate = float(cfg['decay_rate'])
        groups = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            no_decay = backbone.no_weight_decay(name, param)
            layer_id = backbone.layer_id_for_decay(name, num_layers)
            key = f'layer_{layer_id}_{"no_decay" if no_decay else "decay"}'
            if key not in groups:
                scale = decay_rate ** (num_layers + 1 - layer_id)
                groups[key] = dict(params=[], param_names=[], lr=scale * self.base_lr,
                                   lr_scale=scale, group_name=key,
                                   weight_decay=0. if no_decay else self.base_wd)
            groups[key]['params'].append(param)
            groups[key]['param_names'].append(name)
        rank, _ = get_dist_info()
        if rank == 0:
            summary = {k: dict(lr_scale=g['lr_scale'], weight_decay=g['weight_decay'],
                               num_params=len(g['params'])) for k, g in groups.items()}
            MMLogger.get_current_instance().info(
                f'Layer-wise lr decay {decay_rate} over {num_layers} layers: '
                f'{json.dumps(summary, sort_keys=True)}')
        params.extend(groups.values())
