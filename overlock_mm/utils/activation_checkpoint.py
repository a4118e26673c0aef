"""Activation (gradient) checkpointing of one block, with BatchNorm statistics updated once.

Checkpointing runs a block's forward a second time during backward. With
``torch.utils.checkpoint`` every BatchNorm inside would then update its running mean / variance
and ``num_batches_tracked`` a second time from the same batch, so a model trained with
``with_cp=True`` would end with other BatchNorm statistics (a faster moving average, twice the
batch count) than the same training without it -- and evaluate differently.
:func:`checkpoint_block` recomputes with the running statistics frozen: the recomputed forward
normalises with the same batch statistics as the first one (so outputs and gradients are
unchanged) but leaves the buffers as the first forward left them.

:func:`sequential_with_recompute` applies the same to a few runs of layers inside a block
(selective recomputation: keep what is expensive to recompute, recompute what is cheap to run
but large to keep -- Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
Models", 2022, apply the idea to attention). Those runs are many and short (OverLoCK-T: 74 per
step, 3-25 layers each).

Both go through one lean ``autograd.Function`` (:class:`_Recompute`) rather than
``torch.utils.checkpoint``: the first forward runs without autograd at all (no graph, no
saved-tensor hooks), and backward runs the layers again with autograd and differentiates that.
On a GPU, where a batch-1 training step is bound by the host's per-operation work, the
bookkeeping of ``torch.utils.checkpoint`` was the recomputation's main cost
(docs/performance.md). Whole blocks replay the random number generators (drop-path masks
repeat); the short ranges skip that and refuse layers that draw random numbers (dropout).
"""
import contextlib
import functools
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
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


def _skips_count_without_buffer(m: nn.Module) -> bool:
    """``m``'s forward leaves ``num_batches_tracked`` alone where the buffer is None:
    ``_BatchNorm.forward`` (BatchNorm1d/2d/3d), and classes that declare the same with
    ``skips_count_without_buffer = True`` (``overlock_mm.layers.norm.BatchNorm2d``)."""
    cls = type(m)
    return cls.forward is _BatchNorm.forward or getattr(cls, 'skips_count_without_buffer', False)


def _freeze_statistics(norms: Sequence[nn.Module]) -> list:
    """Freeze the running statistics of ``norms`` (layers that :func:`_tracks_statistics`);
    returns what :func:`_restore_statistics` needs. See :func:`frozen_bn_statistics`. Attributes
    are set the way ``nn.Module.__setattr__`` would (``momentum`` is a plain attribute,
    ``num_batches_tracked`` a buffer), without its checks."""
    saved = []
    for m in norms:
        tracked, backup = m._buffers.get('num_batches_tracked'), None
        if tracked is not None:
            if _skips_count_without_buffer(m):
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
    ``_BatchNorm.forward`` (BatchNorm1d/2d/3d) or declares that it behaves the same
    (:func:`_skips_count_without_buffer`), which skips the count when the buffer is
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


def _run_layers(layers: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


def _autocast_state(device_type: str) -> Tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(
        device_type)


def _rng_state(device: torch.device) -> Tuple[torch.device, torch.Tensor, Optional[torch.Tensor]]:
    """The CPU generator's state and, for a CUDA ``device``, that device's."""
    cuda = torch.cuda.get_rng_state(device) if device.type == 'cuda' else None
    return device, torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replayed_rng(state: Tuple[torch.device, torch.Tensor, Optional[torch.Tensor]]
                  ) -> Iterator[None]:
    """Inside, the generators of :func:`_rng_state` start where they were when it was taken
    (so drop-path masks repeat); on exit they continue where they were before."""
    device, cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


class _Recompute(torch.autograd.Function):
    """``fn(*args)`` keeping only ``args``; backward runs ``fn`` again and differentiates it.

    ``plan`` is ``(norms, params, autocast, rng)``: the layers whose running statistics are
    frozen during the recomputation, the trainable parameters (also the function's trailing
    inputs, so their gradients reach the autograd engine like any other: accumulation, DDP's
    reducer hooks), the first forward's autocast states and, where ``fn`` may draw random
    numbers, the generators' states before it. ``fn`` returns a tensor or a tuple of tensors
    and ``None``. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, fn: Callable[..., Any], plan: tuple, n_args: int, *tensors: Any) -> Any:
        ctx.fn, ctx.plan, ctx.n_args = fn, plan, n_args
        args = tensors[:n_args]
        ctx.save_for_backward(*args)
        return fn(*args)  # autograd is off inside forward: nothing else is kept

    @staticmethod
    def backward(ctx, *grads: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
        norms, params, autocast, rng = ctx.plan
        needs = ctx.needs_input_grad[3:]
        n = ctx.n_args
        args = [a if a is None else a.detach().requires_grad_(need)
                for a, need in zip(ctx.saved_tensors, needs[:n])]
        with contextlib.ExitStack() as stack:
            # the autocast state of the first forward (backward runs outside the caller's
            # context); entered only where it differs, as entering costs host time
            for state in autocast:
                if state != _autocast_state(state[0]):
                    stack.enter_context(torch.autocast(state[0], state[2], state[1]))
            if rng is not None:
                stack.enter_context(_replayed_rng(rng))
            stack.callback(_restore_statistics, _freeze_statistics(norms))
            with torch.enable_grad():
                out = ctx.fn(*args)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        inputs = ([a for a, need in zip(args, needs[:n]) if need]
                  + [p for p, need in zip(params, needs[n:]) if need])
        result = iter(torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs],
                                          allow_unused=True)
                      if inputs and pairs else [None] * len(inputs))
        return (None, None, None, *(next(result) if need else None for need in needs))


def _recompute(fn: Callable[..., Any], subs: Sequence[nn.Module], args: Sequence[Any],
               preserve_rng: bool) -> Any:
    """``fn(*args)`` through :class:`_Recompute`; ``subs`` (from :func:`_submodules`) are all
    the modules ``fn`` runs.

    Inside a ``torch.compile`` trace, which cannot trace :class:`_Recompute` (its backward calls
    ``torch.autograd.grad`` and sets BatchNorm attributes), the range goes through
    ``torch.utils.checkpoint`` instead: the compiler keeps its inputs only and recomputes the
    rest in the compiled backward, where running-statistic updates are applied once (they are
    functional in the traced graph).
    """
    if torch.compiler.is_compiling():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False,
                                                 preserve_rng_state=preserve_rng)
    # each trainable parameter once (a shared one listed twice would get its gradient twice)
    params = list({id(p): p for m in subs for p in m._parameters.values()
                   if p is not None and p.requires_grad}.values())
    norms = [m for m in subs if _tracks_statistics(m)]
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device('cpu'))
    autocast = tuple(_autocast_state(d) for d in {device.type, 'cpu'})
    rng = _rng_state(device) if preserve_rng else None
    return _Recompute.apply(fn, (norms, params, autocast, rng), len(args), *args, *params)


def checkpoint_block(block: nn.Module, *args: Any) -> Any:
    """``block(*args)`` checkpointed: only ``args`` are kept for backward, which runs the block
    again with the random number generators replayed (drop-path masks repeat) and BatchNorm
    statistics frozen (they move once, in the first forward)."""
    return _recompute(block, _submodules((block,)), args, preserve_rng=True)


def checkpoint_layers(layers: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``layers`` applied in turn to ``x``, recomputed in backward: only ``x`` is kept,
    BatchNorm statistics are updated by the first forward only. The layers must not draw random
    numbers (dropout, drop path: refused): there is no generator state to replay, which saves
    the host its capture for the many short ranges of ``memory_efficient``."""
    layers = tuple(layers)
    subs = _submodules(layers)
    for m in subs:
        # nn.Dropout*'s p; mmcv's / timm's DropPath's drop_prob
        rate = m.p if isinstance(m, nn.modules.dropout._DropoutNd) else getattr(m, 'drop_prob', 0)
        if rate and m.training:
            raise ValueError(f'checkpoint_layers: {type(m).__name__} draws random numbers, '
                             'which the recomputation would not repeat; use checkpoint_block.')
    return _recompute(functools.partial(_run_layers, layers), subs, (x,), preserve_rng=False)


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
