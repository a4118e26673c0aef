"""An mmpretrain ``ImageClassifier`` that also loads the authors' released checkpoints as-is."""
from mmpretrain.models.classifiers import ImageClassifier

from ..registry import MODELS
from ..utils.checkpoint import reparameterize_state_dict
from ..utils.convert import is_released_cls_layout, released_cls_to_mmpretrain


@MODELS.register_module()
class OverLoCKClassifier(ImageClassifier):
    """``ImageClassifier`` + load-time conversion of released OverLoCK weights.

    ``load_from='overlock_t_in1k_224.pth'`` (a bare timm-style state dict) is remapped to
    ``backbone.*`` / ``head.head.*`` / ``head.aux_head.*`` before loading, so nothing is
    reported as missing or unexpected. Training-form weights loaded into a re-parameterised
    (``deploy=True``) backbone are fused on the fly. Everything else is plain ImageClassifier.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._register_load_state_dict_pre_hook(self._adapt_released_layout)

    def _adapt_released_layout(self, state_dict, prefix, *args):
        # Runs on the top-level module first, before any missing/unexpected bookkeeping.
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        changed = False
        if is_released_cls_layout(own):
            own = released_cls_to_mmpretrain(own)
            changed = True
        if getattr(self.backbone, 'deploy', False) and any(
                k.endswith('.origin_bn.weight') for k in own):
            own = reparameterize_state_dict(own)
            changed = True
        if changed:
            for k in [k for k in state_dict if k.startswith(prefix)]:
                del state_dict[k]
            state_dict.update({prefix + k: v for k, v in own.items()})
