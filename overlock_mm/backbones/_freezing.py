"""``frozen_stages`` and ``norm_eval``: the training-mode behaviour the three backbones share.

mmengine's runners call ``model.train()`` at the start of every training loop (and after each
validation), which would put frozen parts and their BatchNorms back into training mode. So the
freezing is re-applied by :meth:`FrozenStagesMixin.train` on every call, as mmpretrain's and
mmdet's backbones do; what counts as one "stage" is each backbone's own
(:meth:`FrozenStagesMixin._stage_modules`).
"""
from typing import List

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


class FrozenStagesMixin:
    """Freezes the first ``self.frozen_stages`` parts and keeps BatchNorms in eval mode when
    ``self.norm_eval``; mix in before :class:`~mmengine.model.BaseModule`.

    A subclass sets ``frozen_stages`` (checked with
    :func:`~overlock_mm.backbones._checks.check_frozen_stages`) and ``norm_eval``, implements
    :meth:`_stage_modules` and calls :meth:`_freeze_stages` once its modules exist.
    """

    frozen_stages: int
    norm_eval: bool

    def _stage_modules(self) -> List[List[nn.Module]]:
        """The parts ``frozen_stages`` counts, in forward order, each a list of modules."""
        raise NotImplementedError

    def _freeze_stages(self) -> None:
        """Eval mode and no gradients for the parameters of the first ``frozen_stages`` parts."""
        for modules in self._stage_modules()[:max(self.frozen_stages, 0)]:
            for m in modules:
                m.eval()
                for p in m.parameters():
                    p.requires_grad = False

    def train(self, mode: bool = True):
        """``nn.Module.train``, then the frozen parts back to eval mode and, with
        ``norm_eval``, every BatchNorm too."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self
