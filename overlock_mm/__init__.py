"""overlock-mm: the OverLoCK ConvNet backbone (CVPR 2025) for the OpenMMLab 2.x stack.

Importing the package registers ``OverLoCK`` (and, when mmpretrain is installed,
``OverLoCKClsHead``) in mmengine's root ``MODELS`` registry, which mmdet, mmseg and mmpretrain
all fall back to: use ``custom_imports = dict(imports=['overlock_mm'], allow_failed_imports=False)``.
"""
__version__ = '0.1.0'

from .backbones import OverLoCK  # noqa: E402
from .heads import *  # noqa: E402,F401,F403
from .ops import na2d_av  # noqa: E402

__all__ = ['OverLoCK', 'na2d_av', '__version__']
