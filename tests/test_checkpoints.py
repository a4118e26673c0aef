"""Released checkpoints -> our configs: conversion, load-time conversion, refusals.

Synthetic files shaped exactly like every released kind (tests/released_checkpoints.py: backbone
keys from tests/data/official_keys, mmdet 2.28 / mmseg 0.30 head layouts written out from those
versions) are converted, loaded into our configs' models and checked tensor by tensor (values
compared with what was written) and, where the unconverted network exists, output by output.
"""
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import released_checkpoints as rc
from overlock_mm import OverLoCK
from overlock_mm.heads import OverLoCKClsHead
from overlock_mm.utils.checkpoint import CheckpointError, read_checkpoint
from overlock_mm.utils.convert import convert_released, detect_layout, released_cls_to_mmpretrain

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))
import convert_checkpoint as cc  # noqa: E402

CLS_CFG = str(ROOT / 'configs/mmpretrain/overlock-{}_8xb256_in1k.py')
CLS_DEPLOY_CFG = str(ROOT / 'configs/mmpretrain/overlock-{}_8xb256_in1k_deploy.py')
DET_CFG = str(ROOT / 'configs/mmdet/mask-rcnn_overlock-{}_fpn_8xb2-1x_coco.py')
SEG_CFG = str(ROOT / 'configs/mmseg/upernet_overlock-{}_8xb2-160k_ade20k-512x512.py')


def build(cfg, device='cpu', **options):
    return cc.build_model_from_config(cfg, device=device, cfg_options=options or None).eval()


def mm_load(model, path, strict=True):
    """What ``load_from`` / ``tools/test.py CONFIG CHECKPOINT`` do (mmengine, torch's default
    weights_only=True since torch 2.6)."""
    from mmengine.runner.checkpoint import load_checkpoint
    return load_checkpoint(model, str(path), map_location='cpu', strict=strict, logger='silent')


def assert_all_arrived(model, expected: dict):
    """Every tensor of ``model`` equals the value written under the same (converted) name."""
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k].cpu(), v), k


def image(h=64, w=64, seed=0):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def log_lines():
    lines = []
    return lines, lines.append


# ---------------------------------------------------------------------- recognising the layouts
@pytest.mark.parametrize('arch', rc.ARCHS)
@pytest.mark.parametrize('reparam', [False, True])
def test_detect_released_cls(arch, reparam):
    layout = detect_layout(rc.released_cls(arch, reparam, meta=True))
    assert (layout.kind, layout.arch, layout.deploy) == \
        ('cls_reparam' if reparam else 'cls', arch, reparam)


@pytest.mark.parametrize('arch', rc.DENSE_ARCHS)
@pytest.mark.parametrize('kind', ['det', 'seg'])
def test_detect_released_dense(arch, kind):
    ckpt = (rc.released_det if kind == 'det' else rc.released_seg)(arch, optimizer=False,
                                                                   meta=True)
    layout = detect_layout(ckpt['state_dict'])
    assert (layout.kind, layout.arch, layout.layout, layout.backbone_prefix) == \
        (kind, arch, kind, 'backbone.')


# ------------------------------------------------------------------------------ ImageNet (xt)
@pytest.mark.parametrize('reparam', [False, True], ids=['train', 'reparam'])
def test_cls_convert_load_and_outputs(tmp_path, reparam):
    arch = 'xt'
    released = rc.released_cls(arch, reparam)
    src = rc.save(released, tmp_path / 'released.pth')
    dst = tmp_path / 'converted.pth'
    lines, log = log_lines()
    new, layout = cc.convert(src, dst, log=log)
    assert layout.kind == ('cls_reparam' if reparam else 'cls')
    assert any('0 missing, 0 unused, 0 shape mismatches' in ln for ln in lines), lines
    assert len(new['meta']['dataset_meta']['classes']) == 1000

    # the converted file in the config's model: every tensor arrived under its new name
    cfg = (CLS_DEPLOY_CFG if reparam else CLS_CFG).format(arch)
    model = build(cfg)
    mm_load(model, dst)
    assert_all_arrived(model, released_cls_to_mmpretrain(released))
    # ... and the released file itself (load-time conversion) gives the same model
    for v in model.state_dict().values():
        v.zero_()
    mm_load(model, src)
    assert_all_arrived(model, released_cls_to_mmpretrain(released))

    # the unconverted network: our backbone + head loaded with the released names as they are
    backbone = OverLoCK(arch, out_indices=(3, 4), deploy=reparam).eval()
    c3 = backbone.embed_dims[3]
    head = OverLoCKClsHead(1000, c3 + c3 // 4, aux_in_channels=c3).eval()
    is_head = [k for k in released if k.startswith(('head.', 'aux_head.'))]
    backbone.load_state_dict({k: v for k, v in released.items() if k not in is_head}, strict=True)
    head.load_state_dict({k: released[k] for k in is_head}, strict=True)
    x = image()
    with torch.no_grad():
        ref = head(backbone(x))
        out = model(x, mode='tensor')
    assert ref.abs().mean() > 1e-3
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_cls_load_from_released_with_ema_runner(tmp_path):
    """``load_from=<released file>`` through a real Runner (EMAHook reads
    checkpoint['state_dict'] before the model sees the file)."""
    from mmengine.runner import Runner
    released = rc.released_cls('xt')
    src = rc.save(released, tmp_path / 'overlock_xt_in1k_224.pth')
    cfg = cc.load_config(CLS_CFG.format('xt'))
    cfg.work_dir = str(tmp_path / 'work')
    cfg.load_from = str(src)
    cfg.launcher = 'none'
    runner = Runner.from_cfg(cfg)
    runner.call_hook('before_run')
    runner.load_or_resume()
    expected = released_cls_to_mmpretrain(released)
    assert_all_arrived(runner.model, expected)
    ema = next(h for h in runner.hooks if type(h).__name__ == 'EMAHook')
    assert_all_arrived(ema.ema_model.module, expected)


# ------------------------------------------------------------------------ COCO / ADE20K (t)
@pytest.mark.parametrize('kind', ['det', 'seg'])
def test_dense_convert_load_and_outputs(tmp_path, kind):
    arch = 't'
    released = (rc.released_det if kind == 'det' else rc.released_seg)(arch)
    src = rc.save(released, tmp_path / f'released_{kind}.pth')
    cfg = (DET_CFG if kind == 'det' else SEG_CFG).format(arch)
    model = build(cfg)
    # load_from=<released file>, unconverted (mmdet 2.28 / mmseg 0.30 names are the same)
    mm_load(model, src)
    assert_all_arrived(model, released['state_dict'])

    if kind == 'seg':  # the command line, through files
        dst = tmp_path / 'converted.pth'
        assert cc.main([str(src), str(dst)]) == 0
        new = read_checkpoint(str(dst))
        for v in model.state_dict().values():
            v.zero_()
        mm_load(model, dst)
        assert_all_arrived(model, released['state_dict'])
    else:  # the library function
        new, layout = convert_released(released)
        assert (layout.kind, layout.arch) == (kind, arch)
        model.load_state_dict(new['state_dict'], strict=True)
    assert set(new) == {'meta', 'state_dict'}  # training state (optimizer) dropped
    dataset_meta = new['meta']['dataset_meta']
    assert tuple(dataset_meta['classes']) == tuple(released['meta']['CLASSES'])
    if kind == 'seg':
        assert [list(p) for p in dataset_meta['palette']] == released['meta']['PALETTE']
    assert new['meta']['overlock']['source_meta']['mmcv_version'] == '1.7.2'

    # the unconverted network: our backbone with the released backbone.* tensors as they are
    backbone = OverLoCK(arch, layout=kind).eval()
    backbone.load_state_dict({k[9:]: v for k, v in released['state_dict'].items()
                              if k.startswith('backbone.')}, strict=True)
    x = image(96, 128)
    with torch.no_grad():
        ref, out = backbone(x), model.backbone(x)
    for r, o in zip(ref, out, strict=True):
        assert r.abs().mean() > 1e-3
        torch.testing.assert_close(o, r, rtol=0, atol=1e-5)
    if kind == 'det':  # and the FPN, built alone and loaded with the released neck.* keys
        from mmdet.registry import MODELS
        neck = MODELS.build(cc.load_config(cfg).model.neck).eval()
        neck.load_state_dict({k[5:]: v for k, v in released['state_dict'].items()
                              if k.startswith('neck.')}, strict=True)
        with torch.no_grad():
            for r, o in zip(neck(ref), model.extract_feat(x), strict=True):
                torch.testing.assert_close(o, r, rtol=0, atol=1e-5)


# ------------------------------------------------ every kind of the biggest variant (keys)
@pytest.mark.parametrize('kind', ['cls', 'cls_reparam', 'det', 'seg'])
def test_big_variants_every_tensor_arrives(kind, arch='b'):
    """Key level, on the meta device (no memory): the converted state dict fills the config's
    model exactly, every tensor under the right name with the right shape."""
    if kind.startswith('cls'):
        ckpt = rc.released_cls(arch, reparam=kind == 'cls_reparam', meta=True)
        cfg = (CLS_DEPLOY_CFG if kind == 'cls_reparam' else CLS_CFG).format(arch)
    else:
        ckpt = (rc.released_det if kind == 'det' else rc.released_seg)(arch, optimizer=False,
                                                                       meta=True)
        cfg = (DET_CFG if kind == 'det' else SEG_CFG).format(arch)
    new, layout = convert_released(ckpt)
    assert (layout.kind, layout.arch) == (kind, arch)
    missing, unused, mismatched = cc.check_against_config(new['state_dict'], cfg)
    assert not (missing or unused or mismatched), (missing, unused, mismatched)


# --------------------------------------------------------------------------------- refusals
def test_refuses_what_is_not_overlock(tmp_path):
    sd = OrderedDict([('conv1.weight', torch.zeros(64, 3, 7, 7)),
                      ('fc.weight', torch.zeros(10, 64))])
    src = rc.save(sd, tmp_path / 'resnet.pth')
    with pytest.raises(CheckpointError, match=r'not an OverLoCK checkpoint.*known layouts'):
        cc.convert(src, tmp_path / 'out.pth')
    assert not (tmp_path / 'out.pth').exists()
    assert cc.main([str(src), str(tmp_path / 'out.pth')]) == 1


def test_shape_mismatch_names_the_likely_fix(tmp_path):
    from overlock_mm.utils.checkpoint import load_backbone_weights
    src = rc.save(rc.released_cls('xt'), tmp_path / 'overlock_xt_in1k_224.pth')
    with pytest.raises(CheckpointError, match=r"does not fit this OverLoCK: .* shape mismatches"
                                              r".*is the arch right\? This model is 't'"):
        load_backbone_weights(OverLoCK('t'), str(src))
    # same arch, other input channels: only the stem's first conv differs
    with pytest.raises(CheckpointError, match=r'patch_embed1\.0\.weight: checkpoint '
                                              r'\(28, 3, 3, 3\) vs model \(28, 4, 3, 3\); the '
                                              r'checkpoint takes 3-channel inputs: build the '
                                              r'backbone with in_channels=3'):
        load_backbone_weights(OverLoCK('xt', in_channels=4), str(src))
    # another arch with a stem as wide (56), and other input channels too: the arch is the fix
    other = dict(OverLoCK.arch_settings['t'], embed_dims=[56, 128, 256, 512])
    with pytest.raises(CheckpointError, match=r'is the arch right\? This model has a custom '
                                              r'arch dict'):
        load_backbone_weights(OverLoCK(other, in_channels=4), str(src))


def test_uri_without_its_backend_is_named():
    """s3:// goes through mmengine.fileio (torch.hub cannot fetch it); without the backend
    package the error names the URI and the way out."""
    with pytest.raises(CheckpointError, match=r"cannot read 's3://bucket/overlock_t\.pth' "
                       r"through mmengine\.fileio .*pass its local path"):
        read_checkpoint('s3://bucket/overlock_t.pth')


def test_refuses_wrong_shapes_and_missing_tensors():
    sd = rc.released_cls('xt', meta=True)
    sd['patch_embed2.0.weight'] = torch.zeros(112, 56, 5, 5)
    with pytest.raises(CheckpointError, match=r"closest is 'xt'.*patch_embed2.0.weight"):
        detect_layout(sd)
    sd = rc.released_cls('xt', meta=True)
    del sd['blocks2.1.proj.1.lk_origin.weight']
    with pytest.raises(CheckpointError, match=r"closest is 'xt'.*1 missing"):
        detect_layout(sd)


def test_refuses_converted_and_backbone_only():
    with pytest.raises(CheckpointError, match='already in the mmpretrain layout'):
        convert_released(released_cls_to_mmpretrain(rc.released_cls('xt', meta=True)))
    sd = rc.random_state_dict(rc.read_tsv('overlock_xt_seg'), meta=True)
    with pytest.raises(CheckpointError, match='bare OverLoCK backbone'):
        detect_layout(sd)


def test_reports_unused_keys_and_kind_mismatch(tmp_path, capsys):
    ckpt = rc.released_seg('t', optimizer=False, meta=True)  # shapes only: keys are checked
    ckpt['state_dict']['decode_head.extra_conv.weight'] = torch.zeros(3, 3)
    src = rc.save(ckpt, tmp_path / 'seg.pth')
    dst = tmp_path / 'out.pth'
    assert cc.main([str(src), str(dst)]) == 1
    out = capsys.readouterr()
    assert 'unused (file keys the model lacks):' in out.out
    assert 'decode_head.extra_conv.weight' in out.out
    assert '1 unused' in out.err and not dst.exists()
    assert cc.main([str(src), str(dst), '--allow-partial']) == 0 and dst.exists()
    assert cc.main([str(src), str(dst), '--kind', 'det', '--no-verify']) == 1
    assert "is a 'seg' checkpoint" in capsys.readouterr().err


def test_refuses_pickled_code(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / 'pwned',))
    src = tmp_path / 'evil.pth'
    torch.save({'state_dict': rc.released_cls('xt', meta=True), 'x': Payload()}, src)
    assert cc.main([str(src), str(tmp_path / 'out.pth')]) == 1
    err = capsys.readouterr().err
    assert 'refusing to load' in err and 'pathlib' in err
    assert not (tmp_path / 'pwned').exists()
