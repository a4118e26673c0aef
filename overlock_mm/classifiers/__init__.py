"""mmpretrain model wrappers (need mmpretrain)."""
try:
    from .overlock_classifier import OverLoCKClassifier
except ImportError as e:  # mmpretrain not installed
    if 'mmpretrain' not in str(e):
        raise
    __all__ = []
else:
    __all__ = ['OverLoCKClassifier']
