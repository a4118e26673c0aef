"""The one registry overlock-mm registers into.

``mmengine.registry.MODELS`` is the root of mmdet's, mmseg's and mmpretrain's ``MODELS``
registries. A lookup for ``type='OverLoCK'`` under any of those default scopes falls back to the
root when the child registry lacks the name, so a single registration here serves all three
libraries (after ``custom_imports = dict(imports=['overlock_mm'])``).
"""
from mmengine.registry import MODELS

__all__ = ['MODELS']
