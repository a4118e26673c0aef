"""Choose tile sizes for the Triton ``na2d_av`` kernels on this GPU and write them as a tiles file.

Every candidate tile of each kernel (forward, grad_attn, grad_value) runs at the ContMix calls of
the chosen variants and tasks (the op-level cases of ``benchmark.py``); a candidate whose result
differs from the ``'native'`` implementation by more than 1e-4 is rejected, the others are timed
with ``benchmark.graph_time`` (CUDA graph replays over input sets larger than the L2 cache). The
winner of each kernel has the smallest geometric mean of its time over the fastest candidate's,
case by case. The table is printed; ``--out`` writes the winners in the format of
``OVERLOCK_TRITON_TILES`` (see ``overlock_mm/ops/na2d_triton.py``)::

    python tools/analysis/tune_triton.py --out work_dirs/tiles.json
    OVERLOCK_TRITON_TILES=work_dirs/tiles.json python tools/train.py ...

With ``TRITON_INTERPRET=1`` it runs on CPU in Triton's interpreter (wall-clock times, tiny
``--shape`` cases): a check of the tool itself, not a measurement.
"""
import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# graph_time, input_sets, op_cases: one way to time and to pick the shapes
import benchmark  # noqa: E402

TOL = 1e-4


#: the tile keys of each kernel (those of ``TILES``), in the order of the tuples below
_KEYS = {'forward': ('BLOCK_J', 'BLOCK_D', 'num_warps', 'num_stages'),
         'grad_attn': ('BLOCK_J', 'num_warps', 'num_stages'),
         'grad_value': ('BLOCK_Q', 'BLOCK_D', 'num_warps', 'num_stages')}
#: candidate tiles: around the shipped ones (first), which won on an H100 (the forward's on an
#: H200) -- one or two warps (larger programs were slower everywhere measured), column tiles of
#: 4 to 32, with and without software pipelining; ``BLOCK_D`` 8 splits 16 channels over two
#: programs.
_CANDIDATES = {
    'forward': [(8, 16, 1, 3), (4, 16, 1, 3), (16, 16, 1, 3), (8, 16, 2, 3), (8, 16, 1, 2),
                (8, 16, 1, 4), (8, 16, 1, 1), (8, 8, 1, 3), (4, 8, 1, 3), (32, 16, 1, 3)],
    'grad_attn': [(16, 1, 3), (8, 1, 3), (32, 1, 3), (16, 2, 3), (8, 2, 3), (32, 2, 3),
                  (16, 4, 3), (4, 1, 3)],
    'grad_value': [(8, 16, 1, 1), (8, 16, 1, 3), (16, 16, 1, 1), (16, 16, 2, 1), (8, 16, 2, 1),
                   (4, 16, 1, 1), (8, 8, 1, 1), (16, 16, 2, 3), (32, 16, 2, 1), (32, 16, 4, 1)],
}


def candidates(kernel: str) -> List[Dict[str, int]]:
    """The tiles tried for ``kernel`` (``TILES`` format)."""
    return [dict(zip(_KEYS[kernel], t)) for t in _CANDIDATES[kernel]]


def _cases(args: argparse.Namespace) -> List[benchmark.OpCase]:
    """One per distinct call: the model's (``benchmark.op_cases``) or the ``--shape`` ones."""
    if args.shape:
        return [benchmark.OpCase('shape', 'custom', 0, '-', k, b, g, d, h, w)
                for k, b, g, d, h, w in args.shape]
    seen, out = set(), []
    for c in benchmark.op_cases(args.variants, args.tasks, ['large', 'small'], args.cls_batch,
                                args.dense_batch):
        key = (c.k, c.batch, c.groups, c.head_dim, c.height, c.width)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _run(kernel: str, nt, s: tuple, k: int) -> torch.Tensor:
    attn, value, grad_out = s
    if kernel == 'forward':
        return nt.forward(attn, value, k)
    if kernel == 'grad_attn':
        return nt.grad_attn(grad_out, value, k)
    return nt.grad_value(grad_out, attn, k)


def tune(args: argparse.Namespace, device: torch.device) -> dict:
    from overlock_mm.ops import na2d_triton as nt
    cases = _cases(args)
    results: Dict[str, List[dict]] = {kn: [dict(tile=t, times={}, errors={})
                                           for t in candidates(kn)] for kn in args.kernels}
    defaults = {name: dict(cfg) for name, cfg in nt.TILES.items()}
    gen = torch.Generator().manual_seed(0)
    try:
        for case in cases:
            _tune_case(case, args, device, results, defaults, gen)
    finally:
        nt.TILES = defaults
    return dict(cases=[c.name for c in cases], results=results)


def _tune_case(case: benchmark.OpCase, args: argparse.Namespace, device: torch.device,
               results: Dict[str, List[dict]], defaults: dict, gen: torch.Generator) -> None:
    """Check and time every candidate tile of ``args.kernels`` at one call, into ``results``
    (``nt.TILES`` is left set to the last candidate: the caller restores it)."""
    from overlock_mm.ops import na2d_triton as nt
    from overlock_mm.ops.neighborhood import _na2d_av_native
    name, k, b, g, d, h, w = (case.name, case.k, case.batch, case.groups, case.head_dim,
                              case.height, case.width)
    # one set: attn and grad_attn (k * k planes), value, grad_out and one D-channel output
    n_sets = benchmark.input_sets(device, 4 * b * g * h * w * (2 * k * k + 3 * d))
    sets = [(torch.randn(b, g, k * k, h, w, generator=gen).softmax(2).to(device),
             torch.randn(b, g, d, h, w, generator=gen).to(device),
             torch.randn(b, g, d, h, w, generator=gen).to(device)) for _ in range(n_sets)]
    a = sets[0][0].clone().requires_grad_()
    v = sets[0][1].clone().requires_grad_()
    out = _na2d_av_native(a, v, k)
    out.backward(sets[0][2])
    expected = dict(forward=out.detach(), grad_attn=a.grad, grad_value=v.grad)
    print(f'{name}: {n_sets} input sets', flush=True)
    for kn in args.kernels:
        for row in results[kn]:
            nt.TILES = {**defaults, kn: dict(row['tile'])}
            try:
                err = (_run(kn, nt, sets[0], k) - expected[kn]).abs().max().item()
            except Exception as e:  # noqa: BLE001 - a tile that does not compile is a result
                row['errors'][name] = f'{type(e).__name__}: {e}'[:200]
                continue
            if not err <= TOL:
                row['errors'][name] = f'max |error| {err:.2e} > {TOL}'
                continue
            fns = [lambda s=s: _run(kn, nt, s, k) for s in sets]
            if device.type == 'cuda':
                t, why = benchmark.graph_time(fns, device)
                if t is None:
                    row['errors'][name] = why
                    continue
            else:
                t = min(benchmark.time_it(fns[0], device, warmup=1, repeat=args.repeat))
            row['times'][name] = t


def choose(report: dict) -> Dict[str, Dict[str, int]]:
    """Per kernel the tile with the smallest geometric mean of time / fastest time per case
    (tiles that failed any case are out)."""
    chosen = {}
    for kn, rows in report['results'].items():
        ok = [r for r in rows if not r['errors'] and len(r['times']) == len(report['cases'])]
        if not ok:
            continue
        best = {c: min(r['times'][c] for r in ok) for c in report['cases']}
        for r in ok:
            r['score'] = math.exp(sum(math.log(r['times'][c] / best[c]) for c in best) / len(best))
        chosen[kn] = min(ok, key=lambda r: r['score'])['tile']
    return chosen


def print_table(report: dict, chosen: Dict[str, Dict[str, int]], defaults: dict) -> None:
    cases = report['cases']
    print('\ncases: ' + '; '.join(f'c{i}={c}' for i, c in enumerate(cases)))
    for kn, rows in report['results'].items():
        print(f'\n== {kn}: us per call (GPU time), score = geomean(time / best per case)')
        print(f'  {"tile":40} ' + ' '.join(f'{"c%d" % i:>8}' for i in range(len(cases)))
              + f' {"score":>6}')
        for r in sorted(rows, key=lambda r: r.get('score', math.inf)):
            tile = ' '.join(f'{k}={v}' for k, v in r['tile'].items())
            mark = ' <- chosen' if r['tile'] == chosen.get(kn) else (
                ' (default)' if r['tile'] == defaults.get(kn) else '')
            cells = ' '.join(f'{r["times"][c] * 1e6:8.1f}' if c in r['times'] else f'{"x":>8}'
                             for c in cases)
            score = f'{r["score"]:6.2f}' if 'score' in r else f'{"-":>6}'
            print(f'  {tile:40} {cells} {score}{mark}')
            for c, e in r['errors'].items():
                print(f'      failed {c}: {e}')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--variants', nargs='+', default=['t'], choices=['xt', 't', 's', 'b'])
    parser.add_argument('--tasks', nargs='+', default=['det', 'seg'],
                        choices=['cls', 'det', 'seg'])
    parser.add_argument('--cls-batch', type=int, default=32)
    parser.add_argument('--dense-batch', type=int, default=1)
    parser.add_argument('--kernels', nargs='+', default=['forward', 'grad_attn', 'grad_value'],
                        choices=['forward', 'grad_attn', 'grad_value'])
    parser.add_argument('--shape', nargs=6, type=int, action='append',
                        metavar=('K', 'B', 'G', 'D', 'H', 'W'),
                        help='explicit case(s) instead of the model shapes')
    parser.add_argument('--repeat', type=int, default=3, help='CPU (interpreter) timed calls')
    parser.add_argument('--out', help='write the chosen tiles here (OVERLOCK_TRITON_TILES format)')
    parser.add_argument('--json', help='write every measurement here')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    from overlock_mm.ops import na2d_triton as nt
    if torch.cuda.is_available():
        device = torch.device('cuda')
    elif nt.interpreting():
        device = torch.device('cpu')
    else:
        raise SystemExit('tune_triton.py needs a CUDA GPU (or TRITON_INTERPRET=1 to check the '
                         'tool on CPU with small --shape cases).')
    if os.environ.get(nt.TILES_ENV):
        raise SystemExit(f'unset {nt.TILES_ENV} first: the tool measures candidate tiles itself.')
    defaults = {name: dict(cfg) for name, cfg in nt.TILES.items()}
    t0 = time.perf_counter()
    report = tune(args, device)
    chosen = choose(report)
    print_table(report, chosen, defaults)
    report.update(chosen=chosen, defaults=defaults, device=str(device),
                  wall_s=time.perf_counter() - t0,
                  gpu=torch.cuda.get_device_name(device) if device.type == 'cuda' else None,
                  torch=torch.__version__)
    print(f'\nchosen: {json.dumps(chosen)}  ({report["wall_s"]:.0f} s)')
    if args.out:
        missing = sorted(set(args.kernels) - set(chosen))
        if missing:
            raise SystemExit(f'no tile passed every case for {missing}; nothing written.')
        with open(args.out, 'w') as f:
            json.dump(chosen, f, indent=1)
        print(f'wrote {args.out}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=1, default=str)
    return report


if __name__ == '__main__':
    main()
