"""The baseline configs reproduce the published Cascade Mask R-CNN / UperNet rows.

Parameters (every config) and FLOPs (two configs; the rest in tools/analysis/compare_report.py
and docs/baselines.md) within 3% of docs/spec/RESULTS.md; models are built on the meta
device and FLOPs counted with the published protocol (mmdet/mmseg 2.x ``get_flops``: 1280x800
Cascade with 1000 box RoIs / 100 mask RoIs per stage, 2048x512 UperNet without the aux head).
Also: the layer-decay optimiser constructor reproduces the authors' lr/decay groups.
"""
from functools import lru_cache

import pytest
import torch
import torch.nn as nn

from tool_utils import load_tool

compare_report = load_tool('tools/analysis/compare_report.py', 'compare_report')

PUBLISHED = compare_report.PUBLISHED
BASELINES = ['MogaNet-S', 'MogaNet-B', 'UniRepLKNet-T', 'UniRepLKNet-S']


@lru_cache(maxsize=None)
def meta_model(task, name):
    return compare_report.build_model(task, name, meta=True)


@pytest.mark.parametrize('task', ['det', 'seg'])
@pytest.mark.parametrize('name', BASELINES)
def test_published_params_within_3_percent(task, name):
    model = meta_model(task, name)
    params = compare_report.count_params(model) / 1e6
    published = PUBLISHED[task][name]['params']
    assert abs(params / published - 1) <= 0.03, (params, published)
    backbone = type(model.backbone).__name__
    assert backbone == name.split('-')[0]


@pytest.mark.parametrize('task, name', [('det', 'MogaNet-S'), ('seg', 'UniRepLKNet-T')])
def test_published_flops_within_3_percent(task, name):
    flops = compare_report.count_flops(task, meta_model(task, name))
    published = PUBLISHED[task][name]['flops']
    assert abs(flops / published - 1) <= 0.03, (flops, published)


def test_flops_protocol_counts_every_cascade_stage():
    """1000 box RoIs and 100 mask RoIs through each of the 3 stages: 4conv1fc box heads alone
    are 3 x 1000 x (4 x 7*7*256*256*9 + 12544*1024) multiply-adds."""
    model = meta_model('det', 'MogaNet-S')
    proxy = compare_report.flops_proxy('det', model)
    outs = proxy(torch.empty(1, 3, 64, 64, device='meta'))
    assert len(outs) == 1 + 3 + 3
    assert outs[1][0].shape == (1000, 81) and outs[4].shape == (100, 80, 28, 28)


# ------------------------------------------------------------------ layer-wise lr decay
class _Det(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.neck = nn.Conv2d(8, 8, 1)


def _groups(model, num_layers, decay_rate):
    from overlock_mm.backbones._baseline_utils import BackboneLayerDecayOptimWrapperConstructor
    ctor = BackboneLayerDecayOptimWrapperConstructor(
        dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05)),
        dict(num_layers=num_layers, decay_rate=decay_rate, decay_type='layer_wise'))
    wrapper = ctor(model)
    return {n: g for g in wrapper.optimizer.param_groups for n in g['param_names']}


def test_moganet_layer_decay_groups():
    from overlock_mm.backbones import MogaNet
    model = _Det(MogaNet('base'))
    groups = _groups(model, 12, 0.8)

    def scale(name):
        return groups[name]['lr'] / 1e-4

    # Authors' numbering (num_layers 12 -> 14 ids): scale = 0.8 ** (13 - id).
    assert scale('backbone.patch_embed1.projection.0.weight') == pytest.approx(0.8 ** 13)
    assert scale('backbone.blocks1.0.mlp.fc1.weight') == pytest.approx(0.8 ** 11)
    assert scale('backbone.patch_embed3.projection.weight') == pytest.approx(0.8 ** 9)
    assert scale('backbone.blocks3.5.attn.proj_1.weight') == pytest.approx(0.8 ** 8)  # id 5
    assert scale('backbone.blocks3.21.attn.proj_1.weight') == pytest.approx(0.8 ** 2)  # id 11
    assert scale('backbone.blocks4.0.attn.gate.weight') == pytest.approx(0.8)
    assert scale('backbone.norm4.weight') == pytest.approx(1.)
    assert scale('neck.weight') == pytest.approx(1.)
    # No decay: biases and tensors that are 1-D once squeezed (scales, decompose conv, norms).
    for name in ('backbone.blocks2.0.layer_scale_1', 'backbone.blocks2.0.attn.sigma.scale',
                 'backbone.blocks2.0.mlp.decompose.weight', 'backbone.blocks2.0.norm1.weight',
                 'backbone.blocks2.0.attn.gate.bias', 'neck.bias'):
        assert groups[name]['weight_decay'] == 0., name
    for name in ('backbone.blocks2.0.attn.gate.weight', 'neck.weight'):
        assert groups[name]['weight_decay'] == 0.05, name


def test_unireplknet_layer_decay_groups():
    from overlock_mm.backbones import UniRepLKNet
    model = _Det(UniRepLKNet('t'))
    groups = _groups(model, 12, 0.8)

    def scale(name):
        return groups[name]['lr'] / 1e-4

    assert scale('backbone.downsample_layers.0.0.weight') == pytest.approx(0.8 ** 13)
    assert scale('backbone.stages.0.1.pwconv1.1.weight') == pytest.approx(0.8 ** 12)
    assert scale('backbone.downsample_layers.2.0.weight') == pytest.approx(0.8 ** 10)
    assert scale('backbone.stages.2.7.pwconv1.1.weight') == pytest.approx(0.8 ** 8)  # 3 + 7 // 3
    assert scale('backbone.stages.3.0.pwconv1.1.weight') == pytest.approx(0.8)
    assert scale('backbone.norm2.weight') == pytest.approx(1.)
    # UniRepLKNet's rule: 1-D tensors and biases; GRN's [1, 1, 1, C] gamma does decay.
    assert groups['backbone.stages.1.0.gamma']['weight_decay'] == 0.
    assert groups['backbone.stages.1.0.act.1.gamma']['weight_decay'] == 0.05


def test_layer_decay_constructor_errors():
    from overlock_mm.backbones._baseline_utils import BackboneLayerDecayOptimWrapperConstructor
    cfg = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05))
    with pytest.raises(ValueError, match='needs paramwise_cfg with num_layers and decay_rate'):
        BackboneLayerDecayOptimWrapperConstructor(cfg, dict(decay_rate=0.8))(nn.Linear(2, 2))
    with pytest.raises(TypeError, match='no backbone with layer_id_for_decay'):
        BackboneLayerDecayOptimWrapperConstructor(cfg, dict(num_layers=12, decay_rate=0.8))(
            nn.Linear(2, 2))
    # DefaultOptimWrapperConstructor's keys would be ignored by this add_params: refused
    with pytest.raises(ValueError, match=r"keys \['bias_decay_mult', 'custom_keys'\] are not "
                                         r"supported \(valid: num_layers, decay_rate"):
        BackboneLayerDecayOptimWrapperConstructor(
            cfg, dict(num_layers=12, decay_rate=0.8, bias_decay_mult=0.,
                      custom_keys={'gamma': dict(decay_mult=0.)}))(nn.Linear(2, 2))
