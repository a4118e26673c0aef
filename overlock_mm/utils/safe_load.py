"""Let ``torch.load(weights_only=True)`` read mmengine's own checkpoints (resume on torch >= 2.6).

An mmengine Runner checkpoint holds, besides tensors, the message hub's ``HistoryBuffer`` objects
(numpy arrays and scalars inside) and numpy dtypes. ``torch.serialization
.get_unsafe_globals_in_checkpoint`` names exactly: HistoryBuffer, numpy ndarray / dtype /
scalar / ``_reconstruct``, the ``numpy.dtypes.*DType`` classes, and ``builtins.getattr``.

``builtins.getattr`` is the dangerous one: allow-listed as-is it would let a crafted file fetch
any attribute of any allow-listed object. It appears because pickle stores HistoryBuffer's
statistics methods as ``getattr(HistoryBuffer, 'mean')``; we register a *restricted* getattr
under that name that only resolves those methods and refuses everything else.
Nothing is ever loaded with ``weights_only=False``.
"""
import pickle

import torch

_REGISTERED = False
_HISTORY_BUFFER_METHODS = ('min', 'max', 'mean', 'current')


def _restricted_getattr(obj, name: str):
    from mmengine.logging import HistoryBuffer
    allowed = set(_HISTORY_BUFFER_METHODS) | set(HistoryBuffer._statistics_methods)
    if obj is HistoryBuffer and name in allowed:
        return getattr(obj, name)
    # An UnpicklingError, so torch.load reports it like any other refused global.
    raise pickle.UnpicklingError(
        f'checkpoint asks for getattr({obj!r}, {name!r}); only HistoryBuffer statistics methods '
        'are allowed when loading with weights_only=True.')


def register_safe_globals() -> None:
    """Allow-list the non-tensor types of mmengine checkpoints (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import numpy as np
    from mmengine.logging import HistoryBuffer
    try:
        multiarray = np._core.multiarray  # numpy >= 2
    except AttributeError:  # pragma: no cover - numpy 1.x
        multiarray = np.core.multiarray
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith('DType')] \
        if hasattr(np, 'dtypes') else []
    safe = [HistoryBuffer, multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype,
            *dtypes, (_restricted_getattr, 'builtins.getattr')]
    if multiarray.__name__ != 'numpy.core.multiarray':
        # Checkpoints written under numpy 1.x name the old module path.
        safe += [(multiarray._reconstruct, 'numpy.core.multiarray._reconstruct'),
                 (multiarray.scalar, 'numpy.core.multiarray.scalar')]
    torch.serialization.add_safe_globals(safe)
    _REGISTERED = True
