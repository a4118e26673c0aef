"""State-dict keys/shapes equal the authors' released layouts (tests/data/official_keys)."""
from pathlib import Path

import pytest
import torch

from overlock_mm import OverLoCK
from overlock_mm.heads import OverLoCKClsHead

DATA = Path(__file__).parent / 'data' / 'official_keys'
ARCHS = ['xt', 't', 's', 'b']
# The paper / release (docs/spec/ARCHITECTURE.md): re-parameterised params without aux head.
PARAMS_REPARAM_M = {'xt': 16.45, 't': 33.47, 's': 56.16, 'b': 94.94}
# Training-time params without aux head, and of the dense layouts (docs/spec/ARCHITECTURE.md).
PARAMS_TRAIN_M = {'xt': 16.97, 't': 34.48, 's': 57.80, 'b': 97.43}
PARAMS_DET_M = {'xt': 15.66, 't': 33.13, 's': 56.45, 'b': 96.09}
PARAMS_SEG_M = {'xt': 15.51, 't': 32.80, 's': 56.12, 'b': 95.67}


def read_tsv(name):
    out = {}
    for line in (DATA / name).read_text().splitlines():
        key, shape = line.split('\t')
        out[key] = () if shape == 'scalar' else tuple(int(s) for s in shape.split('x'))
    return out


def shapes(module, prefix=''):
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


def build_cls(arch, deploy=False):
    with torch.device('meta'):
        backbone = OverLoCK(arch, layout='cls', deploy=deploy)
        c3 = backbone.embed_dims[3]
        head = OverLoCKClsHead(num_classes=1000, in_channels=c3 + c3 // 4, aux_in_channels=c3)
    return backbone, head


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('layout', ['det', 'seg'])
def test_dense_layout_keys(arch, layout):
    with torch.device('meta'):
        model = OverLoCK(arch, layout=layout)
    expected = read_tsv(f'overlock_{arch}_{layout}.tsv')
    got = shapes(model)
    assert list(got) == list(expected)  # same keys, same order
    assert got == expected


def released_cls_keys(backbone, head):
    """Backbone keys as they are; the head's ``head.*`` / ``aux_head.*`` are the released names."""
    got = shapes(backbone)
    got.update(shapes(head))
    return got


@pytest.mark.parametrize('arch', ARCHS)
def test_cls_layout_keys(arch):
    backbone, head = build_cls(arch)
    expected = read_tsv(f'overlock_{arch}_cls.tsv')
    assert released_cls_keys(backbone, head) == expected


@pytest.mark.parametrize('arch', ARCHS)
def test_cls_reparam_layout_keys(arch):
    expected = read_tsv(f'overlock_{arch}_cls_reparam.tsv')
    backbone, head = build_cls(arch, deploy=True)
    assert released_cls_keys(backbone, head) == expected


def n_params(*modules):
    return sum(p.numel() for m in modules for p in m.parameters())


@pytest.mark.parametrize('arch', ARCHS)
def test_param_counts(arch):
    backbone, head = build_cls(arch)
    head.aux_head = None
    assert round(n_params(backbone, head) / 1e6, 2) == PARAMS_TRAIN_M[arch]
    backbone, head = build_cls(arch, deploy=True)
    head.aux_head = None
    assert round(n_params(backbone, head) / 1e6, 2) == PARAMS_REPARAM_M[arch]
    with torch.device('meta'):
        assert round(n_params(OverLoCK(arch, layout='det')) / 1e6, 2) == PARAMS_DET_M[arch]
        assert round(n_params(OverLoCK(arch, layout='seg')) / 1e6, 2) == PARAMS_SEG_M[arch]


def test_reparam_layout_by_switch_to_deploy():
    """switch_to_deploy() on a training-form network gives the *_reparam layout too."""
    backbone = OverLoCK('xt', layout='cls')
    backbone.switch_to_deploy()
    with torch.device('meta'):
        c3 = backbone.embed_dims[3]
        head = OverLoCKClsHead(num_classes=1000, in_channels=c3 + c3 // 4, aux_in_channels=c3)
    assert released_cls_keys(backbone, head) == read_tsv('overlock_xt_cls_reparam.tsv')
