"""Params and FLOPs (multiply-accumulates) of every OverLoCK variant.

    python tools/analysis/get_flops.py                 # classification 224 + dense layouts
    python tools/analysis/get_flops.py --archs t --no-dense

Classification numbers are counted like the paper's: the re-parameterised classifier without the
aux head, at 224x224. The breakdown separates convolutions (incl. the ContMix ``weight_proj``),
the ContMix aggregation and the query-key affinity -- the three parts of the reference count --
from "other" ops (norms, pooling, resizing) that the reference leaves out. Dense layouts report
the backbone alone (detection 1280x800, segmentation 2048x512).
"""
import argparse
import json

import torch

from overlock_mm import OverLoCK
from overlock_mm.heads import OverLoCKClsHead
from overlock_mm.utils.complexity import flop_breakdown

#: Reference MACs (G) counted independently on the authors' re-parameterised classifier without
#: aux head at 224x224 (project issue 2); the paper prints 2.6 / 5.5 / 9.7 / 16.7 GFLOPs.
REFERENCE_G = {
    'xt': dict(convolutions=2.66, aggregation=0.03, affinity=0.008, total=2.70),
    't': dict(convolutions=5.57, aggregation=0.06, affinity=0.016, total=5.64),
    's': dict(convolutions=9.76, aggregation=0.10, affinity=0.026, total=9.89),
    'b': dict(convolutions=16.90, aggregation=0.15, affinity=0.040, total=17.09),
}
#: Params (M) after re-parameterisation without aux head (the paper's 16 / 33 / 56 / 95 M).
REFERENCE_PARAMS_M = {'xt': 16.45, 't': 33.47, 's': 56.16, 'b': 94.94}


class Classifier(torch.nn.Module):
    """Backbone + main head, as deployed (aux head dropped, re-parameterised)."""

    def __init__(self, arch: str) -> None:
        super().__init__()
        self.backbone = OverLoCK(arch, layout='cls', contmix_impl='auto')
        c3 = self.backbone.embed_dims[3]
        self.head = OverLoCKClsHead(num_classes=1000, in_channels=c3 + c3 // 4)
        self.backbone.switch_to_deploy()

    def forward(self, x):
        return self.head(self.backbone(x))


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def classification(arch: str, size: int = 224) -> dict:
    model = Classifier(arch).eval()
    with torch.no_grad():
        macs = flop_breakdown(model, torch.zeros(1, 3, size, size))
    return dict(params=count_params(model), **macs)


def dense(arch: str, layout: str, hw) -> dict:
    model = OverLoCK(arch, layout=layout, contmix_impl='auto').eval()
    with torch.no_grad():
        macs = flop_breakdown(model, torch.zeros(1, 3, *hw))
    return dict(params=count_params(model), **macs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--archs', nargs='+', default=list(REFERENCE_G), choices=list(REFERENCE_G))
    parser.add_argument('--no-dense', action='store_true', help='skip the dense layouts')
    parser.add_argument('--json', help='also write the numbers to this file')
    args = parser.parse_args()

    results = {}
    print('Classification, 224x224, re-parameterised, no aux head (MACs, G):')
    print(f'{"arch":5} {"params M":>9} {"ref":>7} | {"conv":>7} {"aggr":>6} {"affin":>6} '
          f'{"total":>7} {"ref":>7} {"diff":>6} | {"other":>6}')
    for arch in args.archs:
        r = classification(arch)
        results[f'{arch}_cls_224'] = r
        ref = REFERENCE_G[arch]
        g = {k: r[k] / 1e9 for k in ('convolutions', 'aggregation', 'affinity', 'total')}
        print(f'{arch:5} {r["params"] / 1e6:9.2f} {REFERENCE_PARAMS_M[arch]:7.2f} | '
              f'{g["convolutions"]:7.3f} {g["aggregation"]:6.3f} {g["affinity"]:6.3f} '
              f'{g["total"]:7.3f} {ref["total"]:7.2f} '
              f'{100 * (g["total"] / ref["total"] - 1):+5.2f}% | '
              f'{r.get("other", 0) / 1e9:6.3f}')
    if not args.no_dense:
        print('\nDense layouts, backbone only (MACs, G):')
        for arch in args.archs:
            for layout, hw in (('det', (800, 1280)), ('seg', (512, 2048))):
                r = dense(arch, layout, hw)
                results[f'{arch}_{layout}_{hw[1]}x{hw[0]}'] = r
                print(f'{arch:5} {layout:4} {hw[1]}x{hw[0]}: params {r["params"] / 1e6:6.2f} M, '
                      f'conv {r["convolutions"] / 1e9:7.2f}, '
                      f'aggregation {r["aggregation"] / 1e9:6.2f}, '
                      f'affinity {r["affinity"] / 1e9:6.3f}, total {r["total"] / 1e9:7.2f} '
                      f'(+ other {r.get("other", 0) / 1e9:5.2f})')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=2)


if __name__ == '__main__':
    main()
