"""overlock-mm: the OverLoCK ConvNet backbone (CVPR 2025) for the OpenMMLab 2.x stack.

Importing the package registers ``OverLoCK`` (and, when mmpretrain is installed,
``OverLoCKClsHead`` and ``OverLoCKClassifier``) in mmengine's root ``MODELS`` registry, which mmdet, mmseg and mmpretrain
all fall back to: use ``custom_imports = dict(imports=['overlock_mm'], allow_failed_imports=False)``.
"""
__version__ = '0.1.0'

from .utils.safe_load import register_safe_globals  # noqa: E402

# mmengine checkpoints (resume) need their few non-tensor types allow-listed for
# torch.load(weights_only=True), the default since torch 2.6. See utils/safe_load.py.
register_safe_globals()

from .backbones import OverLoCK  # noqa: E402
from .classifiers import *  # noqa: E402,F401,F403
from .heads import *  # noqa: E402,F401,F403
from .ops import na2d_av  # noqa: E402

__all__ = ['OverLoCK', 'na2d_av', '__version__']
