"""overlock-mm: the OverLoCK ConvNet backbone (CVPR 2025) for the OpenMMLab 2.x stack.

Importing the package registers ``OverLoCK`` (and, when mmpretrain is installed,
``OverLoCKClsHead`` and ``OverLoCKClassifier``) in mmengine's root ``MODELS`` registry, which
mmdet, mmseg and mmpretrain all fall back to: use
``custom_imports = dict(imports=['overlock_mm'], allow_failed_imports=False)``.
"""
__version__ = '0.1.0'


def _check_environment() -> None:
    """torch and mmcv are not pip requirements (see setup.cfg): say what to do if missing."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ImportError('overlock_mm needs PyTorch: install your build first (CPU: '
                          'bash tools/setup_env.sh; GPU: see README.md "Install on a GPU '
                          'cluster").') from None
    try:
        import mmcv
    except ImportError:
        raise ImportError('overlock_mm needs mmcv 2.x (2.0.0 <= version < 2.2.0, for mmdet 3.3): '
                          'mim install "mmcv==2.1.0" (GPU) or bash tools/setup_env.sh '
                          '(CPU, builds it).') from None
    from mmengine.utils import digit_version
    if not digit_version('2.0.0') <= digit_version(mmcv.__version__) < digit_version('2.2.0'):
        raise ImportError(f'overlock_mm needs 2.0.0 <= mmcv < 2.2.0 (mmdet 3.3 refuses 2.2+); '
                          f'found mmcv {mmcv.__version__}.')


_check_environment()

from .utils.safe_load import register_safe_globals  # noqa: E402

# mmengine checkpoints (resume) need their few non-tensor types allow-listed for
# torch.load(weights_only=True), the default since torch 2.6. See utils/safe_load.py.
register_safe_globals()

from .backbones import OverLoCK  # noqa: E402
from .classifiers import *  # noqa: E402,F401,F403
from .heads import *  # noqa: E402,F401,F403
from .ops import na2d_av  # noqa: E402

__all__ = ['OverLoCK', 'na2d_av', '__version__']
