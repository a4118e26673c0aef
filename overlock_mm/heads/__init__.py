"""Task heads. The classification head needs mmpretrain; without it only the backbone loads."""
try:
    from .overlock_cls_head import OverLoCKClsHead
except ImportError as e:  # mmpretrain not installed: detection/segmentation users do not need it
    if 'mmpretrain' not in str(e):
        raise
    __all__ = []
else:
    __all__ = ['OverLoCKClsHead']
