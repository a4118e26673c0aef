"""OverLoCK's mmpretrain-style API: errors, out_indices, freezing, checkpointing, small inputs."""
import pytest
import torch

from autograd_utils import assert_grads_match, saved_storages
from overlock_mm import OverLoCK

TINY = dict(depths=[1, 1, 1, 1], sub_depths=[1, 2], embed_dims=[16, 32, 64, 96],
            kernel_sizes=[17, 15, 13, 7], num_heads=[2, 3], mlp_ratio=4, sub_mlp_ratio=3)


def tiny(**kw):
    return OverLoCK(dict(TINY), **kw)


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown arch 'huge'.*b, s, t, xt"):
        OverLoCK('huge')


def test_arch_aliases():
    assert OverLoCK._parse_arch('tiny') == OverLoCK._parse_arch('t')


@pytest.mark.parametrize('field', ['depths', 'sub_depths', 'embed_dims', 'kernel_sizes',
                                   'num_heads', 'mlp_ratio', 'sub_mlp_ratio'])
def test_arch_dict_missing_field_is_named(field):
    arch = {k: v for k, v in TINY.items() if k != field}
    with pytest.raises(ValueError, match=f'missing {field}'):
        OverLoCK(arch)


def test_arch_dict_unknown_field_is_named():
    with pytest.raises(ValueError, match='unknown keys depth'):
        OverLoCK(dict(TINY, depth=[1, 1, 1, 1]))


def test_arch_width_not_divisible_by_heads_names_field():
    with pytest.raises(ValueError,
                       match=r'embed_dims\[2\]=60 must be divisible by 4 \* num_heads\[0\]'):
        OverLoCK(dict(TINY, embed_dims=[16, 32, 60, 96]))
    with pytest.raises(ValueError,
                       match=r'embed_dims\[3\]=96 must be divisible by 4 \* num_heads\[1\] = 40'):
        OverLoCK(dict(TINY, num_heads=[2, 10]))
    with pytest.raises(ValueError, match='kernel_sizes'):
        OverLoCK(dict(TINY, kernel_sizes=[17, 15, 13, 8]))
    with pytest.raises(ValueError, match='depths must be a list of 4'):
        OverLoCK(dict(TINY, depths=[1, 1, 1]))


def test_caller_arch_dict_not_mutated():
    arch = dict(TINY)
    OverLoCK(arch)
    assert arch == TINY and arch['mlp_ratio'] == 4


def test_parsed_arch_shares_no_list_with_the_settings_table():
    parsed = OverLoCK._parse_arch('t')
    parsed['depths'].append(99)
    assert OverLoCK.arch_settings['t']['depths'][-1] != 99


def test_out_indices_come_back_in_increasing_order():
    model = OverLoCK(dict(TINY), layout='det', out_indices=(3, -5, 0))
    assert model.out_indices == (0, 3)
    outs = model.eval()(torch.zeros(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [model.out_channels[0], model.out_channels[3]]


def test_bad_layout_and_out_indices():
    with pytest.raises(ValueError, match="unknown layout 'detection'"):
        OverLoCK(dict(TINY), layout='detection')
    with pytest.raises(ValueError, match=r'out_indices \(0, 5\) has 5; valid indices are 0-4'):
        OverLoCK(dict(TINY), out_indices=(0, 5))
    with pytest.raises(ValueError, match='has True'):  # a bool is not an index
        OverLoCK(dict(TINY), out_indices=(True,))
    with pytest.raises(ValueError, match='non-empty sequence'):
        OverLoCK(dict(TINY), out_indices=())
    with pytest.raises(ValueError, match=r'frozen_stages=6 must be an int from -1 to 5: .*'
                                         r'Overview-Net: patch_embed4'):
        OverLoCK(dict(TINY), frozen_stages=6)
    for bad in (-2, True, '1'):  # a bool or a str compared with ints before
        with pytest.raises(ValueError, match=f'frozen_stages={bad!r}'):
            OverLoCK(dict(TINY), frozen_stages=bad)


def test_numpy_integer_out_indices_are_indices():
    import numpy as np
    assert OverLoCK(dict(TINY), out_indices=[np.int64(3), np.int32(4)]).out_indices == (3, 4)
    with pytest.raises(ValueError, match='has 3.0 of type float; indices must be ints'):
        OverLoCK(dict(TINY), out_indices=(3.0,))


def test_bad_arch_values_and_kernel_options_are_named_at_construction():
    # each failed only later before: inside a block (ZeroDivisionError, TypeError) or at the
    # first forward (smk_size, contmix_impl) -- after the dataset and the weights had loaded
    with pytest.raises(ValueError, match=r'num_heads must be a list of 2 positive ints, got '
                                         r'\[0, 3\]'):
        OverLoCK(dict(TINY, num_heads=[0, 3]))
    with pytest.raises(ValueError, match='mlp_ratio must be a list of 4 positive numbers'):
        OverLoCK(dict(TINY, mlp_ratio=[4, 4, 0, 4]))
    for smk in (4, 15, 0, 5.0):
        with pytest.raises(ValueError, match=f'smk_size={smk!r} must be an odd int from 1 to 7'):
            OverLoCK(dict(TINY), smk_size=smk)
    assert OverLoCK(dict(TINY), smk_size=3).sub_blocks3[0].smk_size == 3
    with pytest.raises(ValueError, match=r"unknown contmix_impl 'trition'; valid: 'auto', .*"
                                         r"'reference', 'triton'"):
        OverLoCK(dict(TINY), contmix_impl='trition')
    OverLoCK(dict(TINY), contmix_impl='triton')  # a GPU config built on a CPU-only machine
    for bad in (None, (None, None, 1.), (None, None, None, 1.)):
        with pytest.raises(ValueError, match='ls_init_values needs 4 entries'):
            OverLoCK(dict(TINY), ls_init_values=bad)
    OverLoCK(dict(TINY), ls_init_values=(None, 1e-6, 1., 1.))


def test_bad_inputs():
    model = tiny().eval()
    with pytest.raises(TypeError, match='torch.Tensor'):
        model([torch.zeros(1, 3, 64, 64)])
    with pytest.raises(ValueError, match=r'NCHW tensor with 3 channels, got shape \(1, 64, 64\)'):
        model(torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match='3 channels'):
        model(torch.zeros(1, 1, 64, 64))


@pytest.mark.parametrize('layout', ['cls', 'seg', 'det'])
def test_output_shapes(layout):
    model = tiny(layout=layout, out_indices=(0, 1, 2, 3, 4)).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 96, 128))
    assert [tuple(o.shape) for o in outs] == [
        (1, 16, 24, 32), (1, 32, 12, 16), (1, 88, 6, 8), (1, 120, 3, 4), (1, 96, 3, 4)]
    assert model.out_channels == [16, 32, 88, 120, 96]
    # NCHW memory, not just NCHW shape: LayerNorm2d permutes leave channels-last strides
    assert all(o.is_contiguous() for o in outs)


def test_outputs_feed_mmcv_roi_align():
    """mmcv's RoIAlign reads the feature map's raw memory as NCHW. On channels-last strided maps
    it pools garbage (the heads of every detector then cannot learn); torchvision's roi_align
    makes its input contiguous first, so the two agree only on a properly laid-out map."""
    mmcv_ops = pytest.importorskip('mmcv.ops')
    torchvision = pytest.importorskip('torchvision')
    model = tiny(layout='det').eval()
    with torch.no_grad():
        feat = model(torch.randn(2, 3, 96, 128))[0]
        rois = torch.tensor([[0, 4., 6., 60., 70.], [1, 30., 2., 120., 90.]])
        ours = mmcv_ops.RoIAlign(7, 0.25, 0, aligned=True)(feat, rois)
        expected = torchvision.ops.roi_align(feat.contiguous(), rois, 7, 0.25, 0, True)
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize('size', [(32, 32), (64, 96), (40, 200), (257, 129)])
def test_small_and_odd_inputs_resize_path(size):
    """Stage-3/4 maps smaller than the kernel go through the spec's resize path."""
    model = tiny(layout='det').eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    assert all(torch.isfinite(o).all() for o in outs)
    assert outs[0].shape[-2:] == ((size[0] + 3) // 4, (size[1] + 3) // 4)


def test_resized_size_matches_spec():
    blk = tiny().sub_blocks3[0]  # K = 13
    assert blk._resized_size(14, 20) == (14, 20)
    assert blk._resized_size(4, 6) == (13, int(13 / 4 * 6))
    assert blk._resized_size(6, 4) == (int(13 / 4 * 6), 13)
    assert blk._resized_size(5, 5) == (13, 13)


def test_frozen_stages_and_norm_eval():
    model = tiny(layout='det', frozen_stages=2, norm_eval=True)
    model.train()
    frozen = [model.patch_embed1, model.blocks1, model.extra_norm[0], model.patch_embed2,
              model.blocks2, model.extra_norm[1]]
    for m in frozen:
        assert all(not p.requires_grad for p in m.parameters())
        assert not m.training
    assert all(p.requires_grad for p in model.blocks3.parameters())
    assert model.blocks3.training
    bns = [m for m in model.sub_blocks3.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)  # norm_eval
    # A runner's later model.eval() / model.train() round trip keeps them frozen.
    model.eval().train()
    assert not model.blocks2.training and model.blocks3.training
    assert all(not m.training for m in bns)
    # A training step leaves frozen weights untouched.
    before = model.blocks1[0].proj[4].weight.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sum(o.mean() for o in model(torch.randn(2, 3, 64, 64))).backward()
    opt.step()
    assert torch.equal(before, model.blocks1[0].proj[4].weight)


def test_switch_to_deploy_keeps_frozen_stages_frozen():
    model = tiny(layout='det', frozen_stages=2)
    model.switch_to_deploy()  # new fused large-kernel convolutions replace the branches
    for i, parts in enumerate(model._stage_modules()):
        grads = {p.requires_grad for m in parts for p in m.parameters()}
        assert grads == ({False} if i < 2 else {True}), i


def test_pretrained_init_cfg_without_checkpoint_is_named():
    model = tiny(init_cfg=[dict(type='Pretrained', prefix='backbone.'),
                           dict(type='Constant', layer='Conv2d', val=0.)])
    with pytest.raises(ValueError, match=r"OverLoCK: init_cfg .* has no checkpoint"):
        model.init_weights()


@pytest.mark.parametrize('drop_path_rate', [0., 0.8])
def test_with_cp_same_gradients_and_batchnorm_statistics(drop_path_rate):
    """A checkpointed block runs its forward twice; gradients, and its BatchNorms' running
    statistics and batch counts, must still end as after one plain training step (the
    statistics moved twice before). With drop path the recomputation must draw the same
    masks."""
    torch.manual_seed(0)
    a = tiny(layout='seg', with_cp=[False, True, True, True], drop_path_rate=drop_path_rate)
    b = tiny(layout='seg', with_cp=False, memory_efficient=False, drop_path_rate=drop_path_rate)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3, 64, 64)  # 4 samples: 4 drop-path draws per block
    for m in (a, b):
        m.train()
        torch.manual_seed(1)
        sum(o.square().mean() for o in m(x)).backward()
    assert_grads_match(a, b)
    buffers = dict(b.named_buffers())
    assert any('num_batches_tracked' in n for n in buffers)
    for n, buf in a.named_buffers():
        torch.testing.assert_close(buf, buffers[n], rtol=0, atol=0, msg=n)


def _training_step(model, x):
    """One forward/backward; returns the outputs, the ids of the storages autograd kept for
    backward (with their bytes) and the outputs of every dilated-branch convolution."""
    from overlock_mm.layers import DilatedReparamBlock
    branch_outputs = []  # the tensors themselves: alive, so no storage can be reused meanwhile
    hooks = [conv.register_forward_hook(lambda mod, inp, out: branch_outputs.append(out))
             for drb in model.modules() if isinstance(drb, DilatedReparamBlock)
             for conv in drb.children() if isinstance(conv, torch.nn.Conv2d)]
    model.train()
    outs, kept = saved_storages(lambda: model(x))
    for h in hooks:
        h.remove()
    sum(o.square().mean() for o in outs).backward()
    return outs, kept, {o.untyped_storage().data_ptr() for o in branch_outputs}


def test_memory_efficient_keeps_less_and_changes_nothing():
    """Selective recomputation (the default) keeps none of the re-parameterisation branches'
    outputs and less memory in all, with the outputs, gradients and BatchNorm statistics of the
    plain training step."""
    torch.manual_seed(0)
    plain = tiny(layout='det', memory_efficient=False)
    lean = tiny(layout='det')
    lean.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    out_plain, kept_plain, branches_plain = _training_step(plain, x)
    out_lean, kept_lean, branches_lean = _training_step(lean, x)
    assert branches_plain <= set(kept_plain)  # the plain step keeps every branch output
    assert not branches_lean & set(kept_lean)
    # ... and saves at least their bytes in all (the MLP tails' maps come on top)
    branch_bytes = sum(kept_plain[p] for p in branches_plain)
    assert sum(kept_lean.values()) <= sum(kept_plain.values()) - branch_bytes
    for a, b in zip(out_lean, out_plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert_grads_match(lean, plain)
    buffers = dict(plain.named_buffers())
    for n, buf in lean.named_buffers():
        torch.testing.assert_close(buf, buffers[n], rtol=0, atol=0, msg=n)


def _lean_flags(model):
    """``memory_efficient`` of each block list's blocks (one value per list)."""
    names = ('blocks1', 'blocks2', 'blocks3', 'blocks4', 'sub_blocks3', 'sub_blocks4')
    return {name: blk.memory_efficient for name in names for blk in getattr(model, name)}


def test_memory_efficient_is_off_inside_checkpointed_blocks():
    model = tiny(layout='det', with_cp=(True, False, True, False))
    assert _lean_flags(model) == dict(blocks1=False, blocks2=True, blocks3=False, blocks4=True,
                                      sub_blocks3=False, sub_blocks4=True)
    assert not any(blk.memory_efficient for blk in tiny(memory_efficient=False).sub_blocks3)
    # per resolution, combined with with_cp
    model = tiny(layout='det', memory_efficient=(True, False, True, False),
                 with_cp=(False, False, True, False))
    assert _lean_flags(model) == dict(blocks1=True, blocks2=False, blocks3=False, blocks4=False,
                                      sub_blocks3=False, sub_blocks4=False)


@pytest.mark.parametrize('name', ['with_cp', 'memory_efficient'])
@pytest.mark.parametrize('flags', [(True, False), (True, False, True, 'yes'), (1, 0, 2, 0)])
def test_per_resolution_flags_need_four_bools(name, flags):
    with pytest.raises(ValueError, match=f'{name} must be a bool or 4 bools'):
        tiny(**{name: flags})


def test_drop_path_rates_rise_linearly():
    model = OverLoCK(dict(TINY), drop_path_rate=0.5)
    order = [*model.blocks1, *model.blocks2, *model.blocks3, *model.blocks4,
             *model.sub_blocks3, *model.sub_blocks4]
    rates = []
    for blk in order:
        dp = blk.proj[9] if hasattr(blk, 'ls') else blk.drop_path
        rates.append(getattr(dp, 'drop_prob', 0.))
    expected = torch.linspace(0, 0.5, len(order)).tolist()
    assert rates == pytest.approx(expected, abs=1e-6)
