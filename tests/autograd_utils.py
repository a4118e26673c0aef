"""What autograd keeps for backward, for the memory tests."""
from typing import Any, Callable, Dict, Tuple

import torch


def saved_storages(fn: Callable[[], Any], min_bytes: int = 0) -> Tuple[Any, Dict[int, int]]:
    """Run ``fn()``; return its output and ``{storage address: bytes}`` of every storage of at
    least ``min_bytes`` that autograd saved for backward meanwhile (each storage once)."""
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.nbytes() >= min_bytes:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, kept
