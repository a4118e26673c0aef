"""Activation (gradient) checkpointing of one block, with BatchNorm statistics updated once.

``torch.utils.checkpoint`` runs a block's forward a second time during backward. In training
mode every BatchNorm inside then updates its running mean / variance and ``num_batches_tracked``
a second time from the same batch, so a model trained with ``with_cp=True`` ends with other
BatchNorm statistics (a faster moving average, twice the batch count) than the same training
without it -- and evaluates differently. :func:`checkpoint_block` recomputes with the running
statistics frozen: the recomputed forward normalises with the same batch statistics as the
first one (so outputs and gradients are unchanged) but leaves the buffers as the first forward
left them.

:func:`sequential_with_recompute` applies the same to a few runs of layers inside a block
(selective recomputation: keep what is expensive to recompute, recompute what is cheap to run
but large to keep -- Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
Models", 2022, apply the idea to attention).
"""
import contextlib
from typing import Any, Callable, Iterator, Sequence, Tuple

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from torch.nn.modules.batchnorm import _BatchNorm


def _tracks_statistics(m: nn.Module) -> bool:
    """A normalisation layer that would update running statistics in its next forward: a
    ``_BatchNorm`` or one that behaves like it (mmcv's ``SyncBatchNorm`` is an ``nn.Module``)."""
    return (m.training and getattr(m, 'track_running_stats', False) is True
            and getattr(m, 'running_mean', None) is not None and hasattr(m, 'momentum'))


@contextlib.contextmanager
def frozen_bn_statistics(*modules: nn.Module) -> Iterator[None]:
    """Inside, BatchNorm layers of ``modules`` in training mode do not change their buffers.

    They still normalise with the batch statistics. ``momentum = 0`` makes the running update
    ``running = running * 1 + batch * 0`` (also when momentum is ``None``, the cumulative
    average). ``num_batches_tracked`` would still count: where the layer runs
    ``_BatchNorm.forward`` (BatchNorm1d/2d/3d), which skips the count when the buffer is
    ``None``, the buffer is set aside -- no clone before and no copy back after, two kernel
    launches and an allocation fewer per BatchNorm and recomputation. Layers with a forward of
    their own (``nn.SyncBatchNorm`` insists on the buffer) count into it and get a saved copy
    back on exit. ``track_running_stats`` stays on: turning it off would change the tensors
    BatchNorm saves for backward, and the recomputation must save the same ones as the first
    forward.
    """
    saved = []
    for m in (sub for module in modules for sub in module.modules()):
        if not _tracks_statistics(m):
            continue
        tracked, backup = m.num_batches_tracked, None
        if tracked is not None:
            if type(m).forward is _BatchNorm.forward:
                m.num_batches_tracked = None
            else:
                backup = tracked.clone()
        saved.append((m, m.momentum, tracked, backup))
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked, backup in saved:
            m.momentum = momentum
            if backup is not None:
                tracked.copy_(backup)
            elif tracked is not None:
                m.num_batches_tracked = tracked


def _checkpoint(fn: Callable[..., Any], modules: Sequence[nn.Module], *args: Any) -> Any:
    """``fn(*args)`` under non-reentrant activation checkpointing (RNG state preserved, so
    drop-path masks repeat); the BatchNorms of ``modules`` are frozen during the recompute."""
    return cp.checkpoint(fn, *args, use_reentrant=False,
                         context_fn=lambda: (contextlib.nullcontext(),
                                             frozen_bn_statistics(*modules)))


def checkpoint_block(block: nn.Module, *args: Any) -> Any:
    """``block(*args)`` checkpointed, BatchNorm statistics updated by the first forward only."""
    return _checkpoint(block, (block,), *args)


def checkpoint_layers(layers: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``layers`` applied in turn to ``x``, checkpointed as one block: only ``x`` is kept for
    backward, BatchNorm statistics are updated by the first forward only."""
    layers = tuple(layers)

    def run(x: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            x = layer(x)
        return x

    return _checkpoint(run, layers, x)


def sequential_with_recompute(seq: nn.Sequential, x: torch.Tensor,
                              ranges: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """``seq(x)``, with the layers ``seq[start:stop]`` of every ``(start, stop)`` in ``ranges``
    recomputed in backward (:func:`checkpoint_layers`) instead of keeping their activations.

    Outputs, gradients and BatchNorm statistics are those of ``seq(x)``; ``ranges`` must be
    increasing and must not overlap.
    """
    layers = list(seq)
    done = 0
    for start, stop in ranges:
        if not done <= start < stop <= len(layers):
            raise ValueError(f'sequential_with_recompute: bad range ({start}, {stop}) for '
                             f'{len(layers)} layers after {done}; ranges must be increasing, '
                             'non-empty and must not overlap.')
        for layer in layers[done:start]:
            x = layer(x)
        x = checkpoint_layers(layers[start:stop], x)
        done = stop
    for layer in layers[done:]:
        x = layer(x)
    return x
