"""Activation (gradient) checkpointing of one block, with BatchNorm statistics updated once.

``torch.utils.checkpoint`` runs a block's forward a second time during backward. In training
mode every BatchNorm inside then updates its running mean / variance and ``num_batches_tracked``
a second time from the same batch, so a model trained with ``with_cp=True`` ends with other
BatchNorm statistics (a faster moving average, twice the batch count) than the same training
without it -- and evaluates differently. :func:`checkpoint_block` recomputes with the running
statistics frozen: the recomputed forward normalises with the same batch statistics as the
first one (so outputs and gradients are unchanged) but leaves the buffers as the first forward
left them.
"""
import contextlib
from typing import Any, Iterator

import torch.nn as nn
import torch.utils.checkpoint as cp
from torch.nn.modules.batchnorm import _BatchNorm


@contextlib.contextmanager
def frozen_bn_statistics(module: nn.Module) -> Iterator[None]:
    """Inside, BatchNorm layers of ``module`` in training mode do not change their buffers.

    ``momentum = 0`` makes the update ``running = running * 1 + batch * 0`` (also when momentum
    is ``None``, the cumulative average); ``num_batches_tracked`` is put back on exit.
    """
    saved = []
    for m in module.modules():
        if isinstance(m, _BatchNorm) and m.training and m.track_running_stats:
            tracked = None if m.num_batches_tracked is None else m.num_batches_tracked.clone()
            saved.append((m, m.momentum, tracked))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def checkpoint_block(block: nn.Module, *args: Any) -> Any:
    """``block(*args)`` under non-reentrant activation checkpointing (RNG state preserved, so
    drop-path masks repeat), BatchNorm statistics updated by the first forward only."""
    return cp.checkpoint(block, *args, use_reentrant=False,
                         context_fn=lambda: (contextlib.nullcontext(),
                                             frozen_bn_statistics(block)))
