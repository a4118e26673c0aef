"""Key mappings between the authors' released layouts and ours.

Backbone keys never change (our modules reproduce the released names). Only the wrapping
differs: the released ImageNet checkpoints are bare timm-style state dicts with the classifier at
``head.*`` / ``aux_head.*``; in an mmpretrain ``ImageClassifier`` the backbone sits under
``backbone.`` and our :class:`~overlock_mm.heads.OverLoCKClsHead` under ``head.`` (holding
``head`` and ``aux_head`` submodules).
"""
from collections import OrderedDict
from typing import Dict

import torch

RELEASED_HEAD_PREFIXES = ('head.', 'aux_head.')


def is_released_cls_layout(sd: Dict[str, torch.Tensor]) -> bool:
    """A bare classification state dict of the release (no ``backbone.`` wrapping)."""
    return 'patch_embed1.0.weight' in sd and not any(k.startswith('backbone.') for k in sd)


def released_cls_to_mmpretrain(sd: Dict[str, torch.Tensor]) -> 'OrderedDict[str, torch.Tensor]':
    """``patch_embed1.*`` -> ``backbone.patch_embed1.*``; ``head.*`` -> ``head.head.*``;
    ``aux_head.*`` -> ``head.aux_head.*``."""
    out = OrderedDict()
    for k, v in sd.items():
        out[('head.' + k) if k.startswith(RELEASED_HEAD_PREFIXES) else ('backbone.' + k)] = v
    return out


def mmpretrain_to_released_cls(sd: Dict[str, torch.Tensor]) -> 'OrderedDict[str, torch.Tensor]':
    """The inverse of :func:`released_cls_to_mmpretrain`."""
    out = OrderedDict()
    for k, v in sd.items():
        if k.startswith('backbone.'):
            out[k[len('backbone.'):]] = v
        elif k.startswith('head.'):
            out[k[len('head.'):]] = v
        else:
            raise KeyError(f'unexpected key {k!r} in an OverLoCK ImageClassifier state dict.')
    return out
