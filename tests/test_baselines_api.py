"""MogaNet / UniRepLKNet backbone API: errors, outputs, freezing, checkpointing, re-param, loading.

Small custom archs keep every test CPU-cheap.
"""
import pytest
import torch
import torch.nn as nn

from autograd_utils import assert_grads_match
from overlock_mm.backbones import MogaNet, UniRepLKNet
from overlock_mm.layers.unirep import UniRepLKNetBlock, UniRepLKReparamBlock
from overlock_mm.utils.checkpoint import CheckpointError

MOGA_TINY = dict(embed_dims=[16, 16, 24, 32], depths=[1, 1, 2, 1], ffn_ratios=[2, 2, 2, 2])
UNIREP_TINY = dict(depths=[1, 1, 2, 1], dims=[8, 16, 24, 32],
                   kernel_sizes=[[3], [7], [13, 3], [5]])


def moga(**kw):
    return MogaNet(dict(MOGA_TINY), **kw)


def unirep(**kw):
    return UniRepLKNet(dict(UNIREP_TINY), **kw)


def randomize_stats(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics, GRN and layer scales, so fusions are really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
        for name, p in model.named_parameters():
            if name.endswith(('act.1.gamma', 'act.1.beta')):
                p.copy_(torch.rand(p.shape, generator=g) - 0.5)
            elif name.endswith('.gamma'):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)


# ----------------------------------------------------------------------------- arch errors
@pytest.mark.parametrize('cls, valid', [(MogaNet, 'base, large, small, tiny, xtiny'),
                                        (UniRepLKNet, 'a, b, f, l, n, p, s, t, xl')])
def test_unknown_arch_lists_valid_names(cls, valid):
    with pytest.raises(ValueError, match=rf"unknown arch 'huge'; valid names: {valid}"):
        cls('huge')
    with pytest.raises(TypeError, match='arch must be a str or dict, got int'):
        cls(3)


def test_arch_aliases():
    assert MogaNet._parse_arch('s') == MogaNet._parse_arch('small')
    assert MogaNet._parse_arch('XT') == MogaNet._parse_arch('xtiny')
    assert UniRepLKNet._parse_arch('tiny') == UniRepLKNet._parse_arch('t')


@pytest.mark.parametrize('field', ['embed_dims', 'depths', 'ffn_ratios'])
def test_moganet_arch_dict_missing_field(field):
    with pytest.raises(ValueError, match=f'missing {field}'):
        MogaNet({k: v for k, v in MOGA_TINY.items() if k != field})


def test_moganet_arch_dict_errors():
    with pytest.raises(ValueError, match='unknown keys depth'):
        MogaNet(dict(MOGA_TINY, depth=[1, 1, 1, 1]))
    with pytest.raises(ValueError, match='depths must be a list of 4'):
        MogaNet(dict(MOGA_TINY, depths=[1, 1, 1]))
    with pytest.raises(ValueError, match=r'embed_dims\[2\]=20 must be divisible by '
                                         r'sum\(attn_channel_split\)=8 .*1:3:4'):
        MogaNet(dict(MOGA_TINY, embed_dims=[16, 16, 20, 32]))
    with pytest.raises(ValueError, match=r'embed_dims\[1\]=16.0 must be a positive int'):
        MogaNet(dict(MOGA_TINY, embed_dims=[16, 16.0, 24, 32]))
    # the divisor follows the split: dims of 4 (not 8) suit a 1:1:2 split
    model = MogaNet(dict(MOGA_TINY, embed_dims=[12, 12, 20, 28]), attn_channel_split=(1, 1, 2))
    assert model(torch.zeros(1, 3, 64, 64))[-1].shape[1] == 28


@pytest.mark.parametrize('field', ['depths', 'dims'])
def test_unireplknet_arch_dict_missing_field(field):
    with pytest.raises(ValueError, match=f'missing {field}'):
        UniRepLKNet({k: v for k, v in UNIREP_TINY.items() if k != field})


def test_unireplknet_arch_dict_errors():
    with pytest.raises(ValueError, match='unknown keys kernel'):
        UniRepLKNet(dict(UNIREP_TINY, kernel=[3]))
    with pytest.raises(ValueError, match=r'no default kernel sizes for depths \[1, 1, 2, 1\]'):
        UniRepLKNet({k: v for k, v in UNIREP_TINY.items() if k != 'kernel_sizes'})
    with pytest.raises(ValueError, match='one size per block'):
        UniRepLKNet(dict(UNIREP_TINY, kernel_sizes=[[3], [7], [13], [5]]))
    with pytest.raises(ValueError, match=r'kernel_sizes has 4; valid kernel sizes: \[3, 5, 7'):
        UniRepLKNet(dict(UNIREP_TINY, kernel_sizes=[[3], [4], [13, 3], [5]]))
    with pytest.raises(ValueError, match=r'dims\[1\]=18 must be divisible by 4'):
        UniRepLKNet(dict(UNIREP_TINY, dims=[8, 18, 24, 32]))
    with pytest.raises(ValueError, match='dims must be a list of 4 positive ints'):
        UniRepLKNet(dict(UNIREP_TINY, dims=[8, 16, 24]))


def test_caller_arch_dict_not_mutated():
    arch = {k: [list(v) for v in val] if k == 'kernel_sizes' else list(val)
            for k, val in UNIREP_TINY.items()}
    UniRepLKNet(arch)
    assert arch == UNIREP_TINY
    arch = dict(MOGA_TINY)
    MogaNet(arch)
    assert arch == MOGA_TINY


def test_default_kernel_sizes_follow_the_release():
    t = UniRepLKNet._parse_arch('t')['kernel_sizes']
    assert t[0] == [3] * 3 and t[1] == [13] * 3 and t[3] == [13] * 3
    assert t[2] == [13, 3] * 9
    assert UniRepLKNet._parse_arch('s')['kernel_sizes'][2] == [13, 3, 3] * 9
    assert UniRepLKNet._parse_arch('n')['kernel_sizes'][2] == [13] * 8


# --------------------------------------------------------------- other argument validation
@pytest.mark.parametrize('cls', [moga, unirep])
def test_bad_out_indices_frozen_stages_with_cp(cls):
    with pytest.raises(ValueError, match=r'out_indices \(0, 4\) has 4; valid indices are 0-3'):
        cls(out_indices=(0, 4))
    with pytest.raises(ValueError, match='out_indices must be an int or a non-empty sequence'):
        cls(out_indices=())
    with pytest.raises(ValueError, match='frozen_stages=5'):
        cls(frozen_stages=5)
    for bad in (-2, True, '2', 1.0):  # an int from -1 to 4, nothing that merely compares as one
        with pytest.raises(ValueError, match=f'frozen_stages={bad!r} must be an int from -1 to 4'):
            cls(frozen_stages=bad)
    with pytest.raises(ValueError, match='with_cp must be a bool or 4 bools'):
        cls(with_cp=(True, False))


def test_unireplknet_layout_errors():
    with pytest.raises(ValueError, match="unknown layout 'det'; valid layouts: cls, dense"):
        unirep(layout='det')
    with pytest.raises(ValueError, match="layout 'cls' only outputs the pooled stage-3"):
        unirep(layout='cls', out_indices=(2, 3))


@pytest.mark.parametrize('cls', [moga, unirep])
def test_bad_inputs(cls):
    model = cls().eval()
    with pytest.raises(TypeError, match='expects a torch.Tensor, got list'):
        model([torch.zeros(1, 3, 32, 32)])
    with pytest.raises(ValueError, match=r'NCHW tensor with 3 channels, got shape \(1, 32, 32\)'):
        model(torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match='3 channels'):
        model(torch.zeros(1, 1, 32, 32))


# ---------------------------------------------------------------------------------- outputs
def test_moganet_outputs():
    model = moga(out_indices=(0, 1, 2, 3)).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [
        (2, 16, 16, 24), (2, 16, 8, 12), (2, 24, 4, 6), (2, 32, 2, 3)]
    assert model.out_channels == [16, 16, 24, 32]
    assert [o.shape[1] for o in moga(out_indices=(-1, 1)).eval()(torch.randn(1, 3, 32, 32))] \
        == [16, 32]
    assert all(o.is_contiguous() for o in outs)  # NCHW memory: see test_backbone_api


def test_unireplknet_outputs():
    model = unirep().eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [
        (2, 8, 16, 24), (2, 16, 8, 12), (2, 24, 4, 6), (2, 32, 2, 3)]
    assert all(o.is_contiguous() for o in outs)  # NCHW memory: see test_backbone_api
    with torch.no_grad():
        (pooled,) = unirep(layout='cls').eval()(torch.randn(2, 3, 64, 64))
    assert pooled.shape == (2, 32)


# ------------------------------------------------------------------- training behaviour
@pytest.mark.parametrize('cls, first, second, bn', [
    (moga, ['patch_embed1', 'blocks1', 'norm1'], 'patch_embed2', 'blocks1.0.norm1'),
    (unirep, ['downsample_layers.0', 'stages.0', 'norm0'], 'downsample_layers.1',
     'stages.0.0.norm')])
def test_frozen_stages(cls, first, second, bn):
    model = cls(frozen_stages=1)
    model.train()
    params = dict(model.named_parameters())
    for name, p in params.items():
        assert p.requires_grad == (not name.startswith(tuple(first))), name
    assert not dict(model.named_modules())[bn].training
    assert dict(model.named_modules())[second].training


@pytest.mark.parametrize('cls', [moga, unirep])
def test_norm_eval(cls):
    model = cls(norm_eval=True)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert model.training


@pytest.mark.parametrize('drop_path_rate', [0., 0.8])
@pytest.mark.parametrize('cls', [moga, unirep])
def test_with_cp_same_gradients_and_batchnorm_statistics(cls, drop_path_rate):
    """Same gradients (with drop path: the recomputation draws the same masks), and
    recomputation under with_cp leaves BatchNorm buffers as one plain step does (they moved
    twice before)."""
    torch.manual_seed(0)
    ref = cls(drop_path_rate=drop_path_rate).train()
    ckpt = cls(with_cp=True, drop_path_rate=drop_path_rate).train()
    ckpt.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    torch.manual_seed(1)
    sum(o.sum() for o in ref(x)).backward()
    torch.manual_seed(1)
    x2 = x.detach().clone().requires_grad_()
    sum(o.sum() for o in ckpt(x2)).backward()
    assert_grads_match(ckpt, ref)
    buffers = dict(ref.named_buffers())
    assert any('num_batches_tracked' in n for n in buffers)
    for n, buf in ckpt.named_buffers():
        torch.testing.assert_close(buf, buffers[n], rtol=0, atol=0, msg=n)


def test_drop_path_rises_linearly():
    model = MogaNet(dict(MOGA_TINY), drop_path_rate=0.5)
    rates = [getattr(b.drop_path, 'drop_prob', 0.) for i in range(1, 5)
             for b in getattr(model, f'blocks{i}')]
    assert rates == pytest.approx([0., 0.125, 0.25, 0.375, 0.5])


# ------------------------------------------------------------------------ re-parameterisation
def test_unireplknet_switch_to_deploy_keeps_outputs():
    torch.manual_seed(0)
    model = unirep(layout='dense').eval()
    randomize_stats(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        model.switch_to_deploy()
        out = model(x)
    assert model.deploy
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for a, b in zip(ref, out):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_unireplknet_branch_table_is_the_releases():
    block = UniRepLKNetBlock(8, 13)
    assert isinstance(block.dwconv, UniRepLKReparamBlock)
    names = [n for n, _ in block.dwconv.named_children()]
    assert names == ['lk_origin', 'origin_bn', 'dil_conv_k5_1', 'dil_bn_k5_1', 'dil_conv_k7_2',
                     'dil_bn_k7_2', 'dil_conv_k3_3', 'dil_bn_k3_3', 'dil_conv_k3_4',
                     'dil_bn_k3_4', 'dil_conv_k3_5', 'dil_bn_k3_5']
    with pytest.raises(ValueError, match='kernel size 4 is not supported'):
        UniRepLKNetBlock(8, 4)


# ----------------------------------------------------------------------- pretrained loading
def released_cls_state_dict(model: nn.Module, head_in: int, extra=None) -> dict:
    """A checkpoint in the authors' classification layout: the backbone keys plus ``head``."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd['head.weight'] = torch.randn(1000, head_in)
    sd['head.bias'] = torch.randn(1000)
    sd.update(extra or {})
    return sd


def test_moganet_loads_released_layout(tmp_path):
    torch.manual_seed(0)
    src = moga().eval()
    randomize_stats(src)
    path = tmp_path / 'moganet.pth.tar'
    # The MogaNet release wraps the weights: {'state_dict': ..., 'author': 'MogaNet', ...}.
    torch.save(dict(state_dict=released_cls_state_dict(src, 32), author='MogaNet', metric=1.),
               path)
    dst = moga(init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    dst.init_weights()
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


def test_unireplknet_loads_imagenet_into_dense_and_deploy(tmp_path):
    torch.manual_seed(0)
    src = unirep(layout='cls').eval()
    randomize_stats(src)
    path = tmp_path / 'unireplknet.pth'
    torch.save(dict(model=released_cls_state_dict(src, 32)), path)
    cfg = dict(type='Pretrained', checkpoint=str(path))

    dense = unirep(layout='dense', init_cfg=cfg)
    dense.init_weights()
    own = dense.state_dict()
    for k, v in src.state_dict().items():
        if not k.startswith('norm.'):
            assert torch.equal(v, own[k]), k
    # norm0-3 exist only in the dense layout: initialised to the identity affine.
    assert torch.equal(own['norm2.weight'], torch.ones(24))

    deploy = unirep(layout='dense', deploy=True, init_cfg=cfg).eval()
    deploy.init_weights()  # training-form weights are fused on the fly
    dense.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(dense(x), deploy(x)):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_unireplknet_deploy_fuses_training_form_by_load_state_dict():
    """load_from / EMA copies reach the model through load_state_dict, not init_cfg."""
    torch.manual_seed(0)
    src = unirep(layout='dense').eval()
    randomize_stats(src)
    deploy = unirep(layout='dense', deploy=True).eval()
    deploy.load_state_dict(src.state_dict())  # strict: every fused key must arrive
    # inside a detector: the backbone's keys under 'backbone.', the rest untouched
    parent = nn.Module()
    parent.backbone, parent.neck = unirep(layout='dense', deploy=True).eval(), nn.Linear(2, 2)
    parent.load_state_dict({f'backbone.{k}': v for k, v in src.state_dict().items()}
                           | {f'neck.{k}': v for k, v in parent.neck.state_dict().items()})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b, c in zip(src(x), deploy(x), parent.backbone(x)):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
            assert torch.equal(b, c)
    # a partial load (load_from with strict=False) fuses what it brings and nothing else:
    # the other blocks keep their weights, deploy-only tensors (lk_origin.bias) included
    before = {k: v.clone() for k, v in deploy.state_dict().items()}
    stage0 = ('stages.0.', 'downsample_layers.0.')
    deploy.load_state_dict({k: v for k, v in unirep(layout='dense').state_dict().items()
                            if k.startswith(stage0)}, strict=False)
    changed = {k for k, v in deploy.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(stage0) for k in changed), sorted(changed)


def test_switch_to_deploy_keeps_frozen_stages_frozen():
    model = unirep(layout='dense', frozen_stages=2)
    model.switch_to_deploy()  # new fused convolutions replace the branches
    for i, parts in enumerate(model._stage_modules()):
        grads = {p.requires_grad for m in parts for p in m.parameters()}
        assert grads == ({False} if i < 2 else {True}), i


@pytest.mark.parametrize('build', [moga, unirep])
def test_pretrained_init_cfg_without_checkpoint_is_named(build):
    model = build(init_cfg=dict(type='Pretrained'))
    with pytest.raises(ValueError, match=r"has no checkpoint; use init_cfg=dict\("
                                         r"type='Pretrained', checkpoint=<path or URL>\)"):
        model.init_weights()


def test_mmdet_checkpoint_prefix_and_errors(tmp_path):
    src = moga()
    path = tmp_path / 'det.pth'
    torch.save(dict(state_dict={f'backbone.{k}': v for k, v in src.state_dict().items()} |
                    {'neck.conv.weight': torch.zeros(1)}), path)
    dst = moga(init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    dst.init_weights()
    assert torch.equal(dst.state_dict()['blocks3.1.mlp.fc1.weight'],
                       src.state_dict()['blocks3.1.mlp.fc1.weight'])

    wrong = tmp_path / 'wrong.pth'
    torch.save(MogaNet('xtiny').state_dict(), wrong)
    with pytest.raises(CheckpointError, match='does not fit MogaNet: .* shape mismatches'):
        moga(init_cfg=dict(type='Pretrained', checkpoint=str(wrong))).init_weights()
    partial = tmp_path / 'partial.pth'
    torch.save({k: v for k, v in src.state_dict().items() if not k.startswith('blocks4')},
               partial)
    with pytest.raises(CheckpointError, match='lacks .* tensors of MogaNet'):
        moga(init_cfg=dict(type='Pretrained', checkpoint=str(partial))).init_weights()
