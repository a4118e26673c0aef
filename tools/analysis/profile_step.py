"""Where one backbone training (or inference) step spends its time: torch.profiler's table, or
on CPU the wall clock by module and autograd node (``--wall``).

    python tools/analysis/profile_step.py --variant t --task det            # CUDA if present
    python tools/analysis/profile_step.py --impl reference --rows 25 --mode infer
    python tools/analysis/profile_step.py --device cpu --wall --no-memory-efficient
    python tools/analysis/profile_step.py --saved [--no-memory-efficient]   # activation census

A training step is the one ``benchmark.py`` times (forward, ``sum(mean(outputs))``, backward),
after ``--warmup`` untimed steps; on CUDA the table is sorted by GPU time (``cuda_time_total``),
on CPU by CPU time. A diagnostic printout, not a measurement to quote: the profiler adds its own
overhead per op.

``--wall`` (CPU) prints instead the step's wall-clock time by leaf module (forward) and by
autograd node (backward), taken with hooks around each one and no profiler: on this project's
2-core VM ``torch.profiler`` put 222-248 ms of self time on each stage-1 1x1 convolution's
backward in an OverLoCK-T detection step, which timed directly took 62-68 ms
(docs/performance.md, session 24). Convolution nodes are labelled with their weight and input
shapes. Forward hooks also fire when ``memory_efficient`` recomputes a range in backward, and the
nodes of that recomputation are timed only as a whole (``_RecomputeBackward``):
``--no-memory-efficient`` shows every node.

``--saved`` prints instead what the training forward keeps for backward: the bytes of every
storage autograd saves (``torch.autograd.graph.saved_tensors_hooks``; each storage counted once),
by the innermost module that saved it first and by that module's parent. Peak memory itself is
``benchmark.py``'s business; this says where it goes.
"""
import argparse
import collections
import os
import sys
import time
from typing import Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark import LAYOUT, MODEL_INPUTS  # noqa: E402  (the benchmark's sizes and layouts)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--variant', default='t', choices=['xt', 't', 's', 'b'])
    parser.add_argument('--task', default='det', choices=sorted(MODEL_INPUTS))
    parser.add_argument('--impl', default='auto', help="contmix_impl ('auto', 'reference', ...)")
    parser.add_argument('--mode', default='train', choices=['train', 'infer'])
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--rows', type=int, default=20, help='table rows')
    parser.add_argument('--device', help="'cuda' or 'cpu' (default: cuda if present)")
    parser.add_argument('--cudnn-benchmark', action='store_true')
    parser.add_argument('--saved', action='store_true',
                        help='census of the activations saved for backward (training forward)')
    parser.add_argument('--wall', action='store_true',
                        help='wall-clock time by leaf module and autograd node (CPU, no profiler)')
    parser.add_argument('--no-memory-efficient', action='store_true',
                        help='OverLoCK(memory_efficient=False): keep every activation')
    return parser.parse_args(argv)


def saved_census(model: torch.nn.Module, x: torch.Tensor, rows: int) -> str:
    """Bytes saved for backward by one training forward, by module type and parent/module."""
    stack = []

    def enter(mod, inputs):
        stack.append(mod)

    def leave(mod, inputs, output):
        stack.pop()  # returns None: the output stays as it is

    hooks = [h for m in model.modules()
             for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    seen = {}
    by_type, by_parent = collections.Counter(), collections.Counter()

    def pack(t):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:  # every saved tensor stays alive until backward: no address reuse
            seen[key] = storage.nbytes()
            names = [type(m).__name__ for m in stack[-2:]] or ['-']
            by_type[names[-1]] += storage.nbytes()
            by_parent['/'.join(names)] += storage.nbytes()
        return t

    try:
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outs = model(x)
    finally:
        for h in hooks:
            h.remove()
    del outs
    lines = [f'saved for backward: {sum(seen.values()) / 2**20:.0f} MiB in {len(seen)} storages']
    for title, counter in (('by module', by_type), ('by parent/module', by_parent)):
        lines.append(f'  {title}:')
        lines += [f'    {name:50} {n / 2**20:9.1f} MiB' for name, n in counter.most_common(rows)]
    return '\n'.join(lines)


def _node_label(node) -> str:
    """An autograd node's name; a convolution's with its weight and input shapes."""
    name = node.name()
    if name == 'ConvolutionBackward0':
        weight, inp = getattr(node, '_saved_weight', None), getattr(node, '_saved_input', None)
        if weight is not None and inp is not None:
            return f'{name} w{list(weight.shape)} x{list(inp.shape)}'
    return name


def wall_times(model: torch.nn.Module, x: torch.Tensor, train: bool, rows: int) -> str:
    """One step's wall-clock time by leaf module type (forward) and autograd node (backward).

    CPU only: the autograd engine runs a CPU graph's nodes one at a time on the calling thread,
    so the time between a node's pre-hook and hook is that node's own work (its intra-op threads
    included); leaf modules likewise in forward.
    """
    clock = time.perf_counter
    fwd, bwd, calls = collections.Counter(), collections.Counter(), collections.Counter()
    starts = []

    def enter(mod, inputs):
        starts.append(clock())

    def leave(mod, inputs, output):
        fwd[type(mod).__name__] += clock() - starts.pop()

    hooks = [h for m in model.modules() if not any(True for _ in m.children())
             for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    begun = {}

    def instrument(root) -> None:
        seen, todo = set(), [root]
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            label = _node_label(node)

            def pre(grad_outputs, key=id(node)):
                begun[key] = clock()

            def post(grad_inputs, grad_outputs, key=id(node), label=label):
                bwd[label] += clock() - begun.pop(key)
                calls[label] += 1

            node.register_prehook(pre)
            node.register_hook(post)
            todo.extend(fn for fn, _ in node.next_functions)

    try:
        model.train(train)
        model.zero_grad(set_to_none=True)
        t0 = clock()
        with torch.set_grad_enabled(train):
            loss = sum(o.float().mean() for o in model(x))
        t_fwd = clock() - t0
        t_bwd = 0.
        if train:
            instrument(loss.grad_fn)
            t0 = clock()
            loss.backward()
            t_bwd = clock() - t0
    finally:
        for h in hooks:
            h.remove()
    lines = [f'forward {t_fwd:.3f} s' + (f', backward {t_bwd:.3f} s' if train else '')]
    lines.append(f'  forward, by leaf module ({sum(fwd.values()):.3f} s in leaves; with '
                 f'memory_efficient also their recomputation in backward):')
    lines += [f'    {name:60} {t * 1e3:9.1f} ms' for name, t in fwd.most_common(rows)]
    if train:
        lines.append(f'  backward, by autograd node ({sum(bwd.values()):.3f} s in nodes):')
        lines += [f'    {name:60} {t * 1e3:9.1f} ms  x{calls[name]}'
                  for name, t in bwd.most_common(rows)]
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = parse_args(argv)
    from overlock_mm import OverLoCK
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.manual_seed(0)
    model = OverLoCK(args.variant, layout=LAYOUT[args.task], contmix_impl=args.impl,
                     memory_efficient=not args.no_memory_efficient).to(device)
    x = torch.randn(args.batch, 3, *MODEL_INPUTS[args.task], device=device)
    if args.wall and device.type != 'cpu':
        raise SystemExit('--wall times the host thread and needs --device cpu; on CUDA the '
                         "profiler's table (GPU time) is the measure")
    if args.saved:
        text = saved_census(model, x, args.rows)
        print(f'{args.variant} {args.task} train {args.impl} batch {args.batch} '
              f'{MODEL_INPUTS[args.task]} on {device}, memory_efficient='
              f'{not args.no_memory_efficient}')
        print(text)
        return text
    model.train(args.mode == 'train')

    def step():
        if args.mode == 'train':
            model.zero_grad(set_to_none=True)
            sum(o.float().mean() for o in model(x)).backward()
        else:
            with torch.no_grad():
                model(x)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    if args.wall:
        text = wall_times(model, x, args.mode == 'train', args.rows)
        print(f'{args.variant} {args.task} {args.mode} {args.impl} batch {args.batch} '
              f'{MODEL_INPUTS[args.task]} on {device}, memory_efficient='
              f'{not args.no_memory_efficient}, wall clock')
        print(text)
        return text
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda'
                                           else [])
    with profile(activities=activities) as prof:
        step()
    key = 'cuda_time_total' if device.type == 'cuda' else 'cpu_time_total'
    table = prof.key_averages().table(sort_by=key, row_limit=args.rows,
                                      max_name_column_width=70)
    print(f'{args.variant} {args.task} {args.mode} {args.impl} batch {args.batch} '
          f'{MODEL_INPUTS[args.task]} on {device}, sorted by {key}')
    print(table)
    return table


if __name__ == '__main__':
    main()
