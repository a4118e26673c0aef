"""Classification head of OverLoCK for mmpretrain, with the deep-supervision aux head.

Layout (released ``head.*`` / ``aux_head.*`` keys, docs/spec/ARCHITECTURE.md "Whole network"):
``head`` = [0 Conv1x1 C -> 1024 (no bias), 1 BN, 2 SiLU, 3 global AvgPool, 4 Conv1x1 1024 -> K];
``aux_head`` = [0 BN(C3), 1 global AvgPool, 2 Conv1x1 C3 -> K] on the Overview-Net output,
trained with ``CE(main) + 0.4 * CE(aux)`` and unused at inference.
In an mmpretrain ``ImageClassifier`` these become ``head.head.*`` / ``head.aux_head.*``; the
released checkpoints are mapped by :func:`overlock_mm.utils.convert.released_cls_to_mmpretrain`
(at load time by :class:`overlock_mm.classifiers.OverLoCKClassifier`).
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmpretrain.models.heads import ClsHead

from ..layers.norm import BatchNorm2d
from ..registry import MODELS


@MODELS.register_module()
class OverLoCKClsHead(ClsHead):
    """Args:
        num_classes (int): number of classes.
        in_channels (int): channels of the final features (``C3 + C3 // 4``).
        aux_in_channels (int, optional): channels of the Overview-Net output (``C3``); None
            disables the aux head. It reads the backbone output at ``aux_index``.
        hidden_channels (int): width of the projection before pooling. Defaults to 1024.
        aux_loss_weight (float): weight of the aux cross-entropy. Defaults to 0.4.
        in_index (int): which backbone output the main head reads. Defaults to 0.
        aux_index (int): which backbone output the aux head reads. Defaults to -1, i.e. use
            ``out_indices=(3, 4)`` in the backbone.
        **kwargs: ``loss``, ``topk``, ``cal_acc``, ``init_cfg`` of :class:`ClsHead`.
    """

    def __init__(self, num_classes: int, in_channels: int, aux_in_channels: Optional[int] = None,
                 hidden_channels: int = 1024, aux_loss_weight: float = 0.4, in_index: int = 0,
                 aux_index: int = -1, **kwargs) -> None:
        kwargs.setdefault('init_cfg', dict(type='TruncNormal', layer=['Conv2d'], std=0.02, bias=0.))
        super().__init__(**kwargs)
        if num_classes <= 0:
            raise ValueError(f'OverLoCKClsHead: num_classes must be positive, got {num_classes}.')
        self.num_classes = num_classes
        self.in_index, self.aux_index = in_index, aux_index
        self.aux_loss_weight = aux_loss_weight
        self.head = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 1, bias=False),
            BatchNorm2d(hidden_channels),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(hidden_channels, num_classes, 1),
        )
        self.aux_head = None
        if aux_in_channels is not None:
            self.aux_head = nn.Sequential(
                BatchNorm2d(aux_in_channels),
                nn.AdaptiveAvgPool2d(1),
                nn.Conv2d(aux_in_channels, num_classes, 1),
            )

    def _select(self, feats: Sequence[torch.Tensor], index: int, what: str,
                channels: int) -> torch.Tensor:
        """Backbone output ``index``, checked to be the ``[N, channels, H, W]`` map ``what``
        reads: with a one-output backbone ``-1`` is the main head's map, so an index alone
        cannot catch a missing ``out_indices=(3, 4)``."""
        if not isinstance(feats, (tuple, list)):
            feats = (feats,)
        fix = ('with the aux head use OverLoCK(out_indices=(3, 4)) and set in_channels / '
               'aux_in_channels to those outputs\' channels')
        try:
            x = feats[index]
        except IndexError:
            raise ValueError(f'OverLoCKClsHead: the {what} reads backbone output {index} but the '
                             f'backbone returned {len(feats)}; {fix}.') from None
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f'OverLoCKClsHead: the {what} expects [N, {channels}, H, W] from '
                             f'backbone output {index} (of {len(feats)}) but got '
                             f'{list(x.shape)}; {fix}.')
        return x

    def pre_logits(self, feats: Tuple[torch.Tensor]) -> torch.Tensor:
        """The pooled 1024-d embedding of the main head."""
        x = self._select(feats, self.in_index, 'main head', self.head[0].in_channels)
        return self.head[:4](x).flatten(1)

    def forward(self, feats: Tuple[torch.Tensor]) -> torch.Tensor:
        x = self._select(feats, self.in_index, 'main head', self.head[0].in_channels)
        return self.head(x).flatten(1)

    def aux_forward(self, feats: Tuple[torch.Tensor]) -> torch.Tensor:
        x = self._select(feats, self.aux_index, 'aux head', self.aux_head[0].num_features)
        return self.aux_head(x).flatten(1)

    def loss(self, feats: Tuple[torch.Tensor], data_samples: List, **kwargs) -> dict:
        losses = self._get_loss(self(feats), data_samples, **kwargs)
        if self.aux_head is not None and self.aux_loss_weight > 0:
            aux = self._get_loss(self.aux_forward(feats), data_samples, **kwargs)['loss']
            losses['loss_aux'] = aux * self.aux_loss_weight
        return losses
