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
Models", 2022, apply the idea to attention). Those runs are many and short (OverLoCK-T: 74 per
step, 3-25 layers each), so they use a leaner mechanism than ``torch.utils.checkpoint``
(:class:`_Recompute`): the first forward runs without autograd at all (no graph, no saved-tensor
hooks), and backward runs the layers again with autograd and differentiates that. On a GPU,
where a batch-1 training step is bound by the host's per-operation work, that bookkeeping is
the recomputation's main cost (docs/performance.md). It assumes layers without randomness
(checked: no dropout); whole blocks (``with_cp``, with DropPath) keep
``torch.utils.checkpoint``, which restores the RNG state.
"""
import contextlib
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from torch.nn.modules.batchnorm import _BatchNorm


def _tracks_statistics(m: nn.Module) -> bool:
    """A normalisation layer that would update running statistics in its next forward: a
    ``_BatchNorm`` or one that behaves like it (mmcv's ``SyncBatchNorm`` is an ``nn.Module``).

    Reads ``_buffers`` directly: this runs for every submodule of every recomputed range, and
    ``nn.Module.__getattr__`` (or an ``AttributeError`` from it) costs microseconds each."""
    return (m.training and m._buffers.get('running_mean') is not None
            and getattr(m, 'track_running_stats', False) is True and hasattr(m, 'momentum'))


def _submodules(modules: Sequence[nn.Module]) -> List[nn.Module]:
    """Every module under ``modules`` (themselves included), each once. A plain walk of
    ``_modules``: ``nn.Module.modules()`` builds every module's dotted name on the way, which
    made the walks a visible part of a batch-1 GPU step's host time."""
    seen, out, stack = set(), [], list(reversed(modules))
    while stack:
        m = stack.pop()
        if m is None or id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        stack.extend(reversed(m._modules.values()))
    return out


def _freeze_statistics(norms: Sequence[nn.Module]) -> list:
    """Freeze the running statistics of ``norms`` (layers that :func:`_tracks_statistics`);
    returns what :func:`_restore_statistics` needs. See :func:`frozen_bn_statistics`. Attributes
    are set the way ``nn.Module.__setattr__`` would (``momentum`` is a plain attribute,
    ``num_batches_tracked`` a buffer), without its checks."""
    saved = []
    for m in norms:
        tracked, backup = m._buffers.get('num_batches_tracked'), None
        if tracked is not None:
            if type(m).forward is _BatchNorm.forward:
                m._buffers['num_batches_tracked'] = None
            else:
                backup = tracked.clone()
        saved.append((m, m.momentum, tracked, backup))
        object.__setattr__(m, 'momentum', 0.0)
    return saved


def _restore_statistics(saved: list) -> None:
    for m, momentum, tracked, backup in saved:
        object.__setattr__(m, 'momentum', momentum)
        if backup is not None:
            tracked.copy_(backup)
        elif tracked is not None:
            m._buffers['num_batches_tracked'] = tracked


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
    saved = _freeze_statistics([m for m in _submodules(modules) if _tracks_statistics(m)])
    try:
        yield
    finally:
        _restore_statistics(saved)


def _checkpoint(fn: Callable[..., Any], modules: Sequence[nn.Module], *args: Any) -> Any:
    """``fn(*args)`` under non-reentrant activation checkpointing (RNG state preserved, so
    drop-path masks repeat); the BatchNorms of ``modules`` are frozen during the recompute."""
    return cp.checkpoint(fn, *args, use_reentrant=False,
                         context_fn=lambda: (contextlib.nullcontext(),
                                             frozen_bn_statistics(*modules)))


def checkpoint_block(block: nn.Module, *args: Any) -> Any:
    """``block(*args)`` checkpointed, BatchNorm statistics updated by the first forward only."""
    return _checkpoint(block, (block,), *args)


def _run_layers(layers: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


def _autocast_state(device_type: str) -> Tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(
        device_type)


class _Recompute(torch.autograd.Function):
    """``_run_layers(layers, x)`` keeping only ``x``; backward runs the layers again.

    The layers' trainable parameters are inputs of the function, so their gradients reach the
    autograd engine like any other (gradient accumulation, DDP's reducer hooks). Not twice
    differentiable.
    """

    @staticmethod
    def forward(ctx, layers: Tuple[nn.Module, ...], norms: List[nn.Module],
                autocast: Tuple[Tuple[str, bool, torch.dtype], ...], x: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        ctx.layers, ctx.norms, ctx.autocast, ctx.params = layers, norms, autocast, params
        ctx.save_for_backward(x)
        return _run_layers(layers, x)  # autograd is off inside forward: nothing else is kept

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        (x,) = ctx.saved_tensors
        needs = ctx.needs_input_grad
        x = x.detach().requires_grad_(needs[3])
        params = [p for p, n in zip(ctx.params, needs[4:]) if n]
        with contextlib.ExitStack() as stack:
            # the autocast state of the first forward (backward runs outside the caller's
            # context); entered only where it differs, as entering costs host time
            for state in ctx.autocast:
                if state != _autocast_state(state[0]):
                    stack.enter_context(torch.autocast(state[0], state[2], state[1]))
            saved = _freeze_statistics(ctx.norms)
            stack.callback(_restore_statistics, saved)
            with torch.enable_grad():
                out = _run_layers(ctx.layers, x)
        inputs = ([x] if needs[3] else []) + params
        grads = iter(torch.autograd.grad(out, inputs, grad, allow_unused=True) if inputs else ())
        return (None, None, None, next(grads) if needs[3] else None,
                *(next(grads) if n else None for n in needs[4:]))


def checkpoint_layers(layers: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``layers`` applied in turn to ``x``, recomputed in backward: only ``x`` is kept,
    BatchNorm statistics are updated by the first forward only. The layers must not draw random
    numbers (dropout): the recomputation would draw other ones."""
    layers = tuple(layers)
    modules = _submodules(layers)
    for m in modules:
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training:
            raise ValueError(f'checkpoint_layers: {type(m).__name__} draws random numbers, '
                             'which the recomputation would not repeat; use checkpoint_block.')
    # each trainable parameter once (a shared one listed twice would get its gradient twice)
    params = list({id(p): p for m in modules for p in m._parameters.values()
                   if p is not None and p.requires_grad}.values())
    norms = [m for m in modules if _tracks_statistics(m)]
    autocast = tuple(_autocast_state(d) for d in {x.device.type, 'cpu'})
    return _Recompute.apply(layers, norms, autocast, x, *params)


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
