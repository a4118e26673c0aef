"""MogaNet / UniRepLKNet state dicts equal the authors' released layouts, and their parameter
counts equal those of the authors' model definitions (docs/spec/RESULTS.md).

Everything is built on the meta device: no memory, no compute.
"""
import re
from pathlib import Path

import pytest
import torch

from overlock_mm.backbones import MogaNet, UniRepLKNet

DATA = Path(__file__).parent / 'data' / 'baseline_keys'
MOGA_ARCHS = ['xtiny', 'tiny', 'small', 'base', 'large']
UNIREP_ARCHS = ['a', 'f', 'p', 'n', 't', 's', 'b']
# docs/spec/RESULTS.md, "Baseline checkpoint layouts": parameter counts (M) of the authors'
# definitions.
MOGA_CLS_M = {'xtiny': 2.96, 'tiny': 5.20, 'small': 25.34, 'base': 43.72, 'large': 82.48}
MOGA_DENSE_M = {'xtiny': 2.76, 'tiny': 4.94, 'small': 24.82, 'base': 43.21, 'large': 81.84}
UNIREP_CLS_M = {'a': 4.65, 'f': 6.49, 'p': 11.08, 'n': 18.82, 't': 31.69, 's': 56.46, 'b': 99.09}
UNIREP_DEPLOY_M = {'a': 4.44, 'f': 6.24, 'p': 10.74, 'n': 18.32, 't': 31.04, 's': 55.65,
                   'b': 98.01}


def read_tsv(name):
    out = {}
    for line in (DATA / f'{name}.tsv').read_text().splitlines():
        key, shape = line.split('\t')
        out[key] = () if shape == 'scalar' else tuple(int(s) for s in shape.split('x'))
    return out


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def head_params(in_features, num_classes=1000):
    """The released classifiers' ``head`` (Linear) lives outside the backbone."""
    with torch.device('meta'):
        return n_params(torch.nn.Linear(in_features, num_classes))


@pytest.mark.parametrize('arch', MOGA_ARCHS)
def test_moganet_dense_layout(arch):
    with torch.device('meta'):
        model = MogaNet(arch)
    expected = read_tsv(f'moganet_{arch}_dense')
    got = shapes(model)
    assert list(got) == list(expected)  # same keys in the same order
    assert got == expected
    assert round(n_params(model) / 1e6, 2) == MOGA_DENSE_M[arch]


@pytest.mark.parametrize('arch', MOGA_ARCHS)
def test_moganet_cls_layout_is_dense_plus_head(arch):
    with torch.device('meta'):
        model = MogaNet(arch, out_indices=3)
    expected = read_tsv(f'moganet_{arch}_cls')
    head = {k: v for k, v in expected.items() if k.startswith('head.')}
    assert head == {'head.weight': (1000, model.embed_dims[-1]), 'head.bias': (1000,)}
    assert shapes(model) == {k: v for k, v in expected.items() if k not in head}
    total = n_params(model) + head_params(model.embed_dims[-1])
    assert round(total / 1e6, 2) == MOGA_CLS_M[arch]


@pytest.mark.parametrize('arch', UNIREP_ARCHS)
def test_unireplknet_cls_layout(arch):
    with torch.device('meta'):
        model = UniRepLKNet(arch, layout='cls')
    expected = read_tsv(f'unireplknet_{arch}_cls')
    without_head = {k: v for k, v in expected.items() if not k.startswith('head.')}
    got = shapes(model)
    assert list(got) == list(without_head)
    assert got == without_head
    assert expected['head.weight'] == (1000, model.dims[-1])
    total = n_params(model) + head_params(model.dims[-1])
    assert round(total / 1e6, 2) == UNIREP_CLS_M[arch]


@pytest.mark.parametrize('arch', UNIREP_ARCHS)
def test_unireplknet_deploy_params(arch):
    """Re-parameterised counts: the fused network of the release (docs/spec/RESULTS.md). It lists
    UniRepLKNet-F as 6.24M where the count is 6,234,600 (the lists were rounded twice, via
    6.235); every other arch agrees to the 2nd decimal, so compare within half a unit."""
    with torch.device('meta'):
        model = UniRepLKNet(arch, layout='cls', deploy=True)
    total = (n_params(model) + head_params(model.dims[-1])) / 1e6
    assert abs(total - UNIREP_DEPLOY_M[arch]) <= 0.005 + 1e-9
    keys = set(shapes(model))
    # layer scale (block-level ``gamma``) is folded into pwconv2; GRN keeps its ``act.1.gamma``
    assert not any('origin_bn' in k or '.dil_' in k or re.fullmatch(r'stages\.\d+\.\d+\.gamma', k)
                   for k in keys)
    assert not any(k.endswith('act.1.beta') or 'pwconv2.2' in k for k in keys)


def test_unireplknet_dense_layout():
    """The mmdet/mmseg layout: the classification keys minus the final ``norm``, plus
    ``norm0-3`` (channels-first LayerNorms of the four outputs)."""
    with torch.device('meta'):
        model = UniRepLKNet('t', layout='dense')
    cls = read_tsv('unireplknet_t_cls')
    expected = {k: v for k, v in cls.items() if not k.startswith(('head.', 'norm.'))}
    expected.update({f'norm{i}.{p}': (c,) for i, c in enumerate([80, 160, 320, 640])
                     for p in ('weight', 'bias')})
    assert shapes(model) == expected


def test_unireplknet_switch_to_deploy_gives_deploy_layout():
    model = UniRepLKNet('a', layout='cls').eval()
    model.switch_to_deploy()
    with torch.device('meta'):
        built = UniRepLKNet('a', layout='cls', deploy=True)
    assert shapes(model) == shapes(built)
