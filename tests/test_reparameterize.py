"""tools/reparameterize.py: any trained OverLoCK checkpoint -> deploy form, outputs within 1e-4.

Training-form models get random weights *and* random BatchNorm statistics (the fusion folds
them), run in eval mode; the deploy model built from the same config (``deploy=True``) loads the
re-parameterised file strictly and must give the same outputs: max |difference| <= 1e-4, relative
to the output scale where outputs exceed 1 (see ``max_err``).
"""
import sys
from pathlib import Path

import pytest
import torch

import released_checkpoints as rc
from overlock_mm import OverLoCK
from overlock_mm.heads import OverLoCKClsHead
from overlock_mm.utils.checkpoint import CheckpointError, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))
import convert_checkpoint as cc  # noqa: E402
import reparameterize as rp  # noqa: E402

TOL = 1e-4
CONFIGS = {
    'cls': ROOT / 'configs/mmpretrain/overlock-xt_8xb256_in1k.py',
    'det': ROOT / 'configs/mmdet/mask-rcnn_overlock-t_fpn_8xb2-1x_coco.py',
    'seg': ROOT / 'configs/mmseg/upernet_overlock-t_8xb2-160k_ade20k-512x512.py',
}
SCOPES = {'cls': 'mmpretrain', 'det': 'mmdet', 'seg': 'mmseg'}


def build(cfg, deploy=False):
    return cc.build_model_from_config(cfg, device='cpu',
                                      cfg_options={'model.backbone.deploy': deploy}).eval()


def mm_load(model, path):
    from mmengine.runner.checkpoint import load_checkpoint
    load_checkpoint(model, str(path), map_location='cpu', strict=True, logger='silent')
    return model


def max_err(a, b):
    """max |a - b| over all outputs, divided by the outputs' scale where it exceeds 1.

    float32 rounding grows with the magnitude: random weights give logits of a few hundred,
    where a perfect fusion still differs by ~1e-4 absolute (2e-6 relative). For outputs of
    order 1 (all dense features here) this is the plain absolute error."""
    return max(((x - y).abs().max() / y.abs().max().clamp(min=1)).item()
               for x, y in zip(a, b, strict=True))


def test_released_cls_to_reparam_layout(tmp_path):
    """The released ImageNet file becomes exactly the released ``*_reparam.pth`` layout."""
    released = rc.released_cls('xt')
    src = rc.save(released, tmp_path / 'overlock_xt_in1k_224.pth')
    dst = tmp_path / 'overlock_xt_in1k_224_reparam.pth'
    assert rp.main([str(src), str(dst)]) == 0
    fused = read_checkpoint(str(dst))
    expected = rc.read_tsv('overlock_xt_cls_reparam')
    assert {k: tuple(v.shape) for k, v in fused.items()} == expected
    assert list(fused) == list(expected)  # same order as the released file
    for k in expected:  # everything but the fused kernels is untouched
        if '.lk_origin.' not in k:
            assert torch.equal(fused[k], released[k]), k

    def network(sd, deploy):
        backbone = OverLoCK('xt', out_indices=(3, 4), deploy=deploy)
        c3 = backbone.embed_dims[3]
        head = OverLoCKClsHead(1000, c3 + c3 // 4, aux_in_channels=c3)
        heads = [k for k in sd if k.startswith(('head.', 'aux_head.'))]
        backbone.load_state_dict({k: v for k, v in sd.items() if k not in heads}, strict=True)
        head.load_state_dict({k: sd[k] for k in heads}, strict=True)
        return backbone.eval(), head.eval()

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        b, h = network(released, False)
        feats = b(x)
        ref = [h(feats), feats[1]]  # logits and the aux head's input
        b, h = network(fused, True)
        feats = b(x)
        out = [h(feats), feats[1]]
    assert ref[0].std() > 1e-2
    assert max_err(out, ref) <= TOL


@pytest.mark.parametrize('task', ['cls', 'det', 'seg'])
def test_trained_checkpoint_to_deploy(tmp_path, task):
    """A checkpoint of our config's model (mmengine format, with training state) -> deploy."""
    from mmengine.logging import HistoryBuffer
    cfg = CONFIGS[task]
    model = rc.randomize_(build(cfg), seed=1)
    hub = {'log_scalars': {'train/loss': HistoryBuffer([1., 2.], [1, 1])}, 'runtime_info':
           {'epoch': 3, 'iter': 30}, 'resumed_keys': {'epoch': True, 'iter': True}}
    ckpt = {'meta': {'epoch': 3, 'iter': 30, 'dataset_meta': {'classes': ('a', 'b')}},
            'state_dict': model.state_dict(), 'optimizer': rc.adamw_state(),
            'message_hub': hub, 'param_schedulers': [{'last_epoch': 3}]}
    src = rc.save(ckpt, tmp_path / 'epoch_3.pth')
    dst = tmp_path / 'deploy.pth'
    lines = []
    assert rp.reparameterize(src, dst, config=cfg, log=lines.append) > 0
    assert any('verified' in ln for ln in lines), lines  # the tool's own check ran and passed
    out_ckpt = read_checkpoint(str(dst))
    assert set(out_ckpt) == {'meta', 'state_dict'}
    assert out_ckpt['meta']['deploy'] is True and out_ckpt['meta']['epoch'] == 3
    assert not any('origin_bn' in k or '.dil_' in k for k in out_ckpt['state_dict'])

    # independent check: the config's deploy model with the new file vs the trained model
    deploy = mm_load(build(cfg, deploy=True), dst)
    ref = rp.model_outputs(model, SCOPES[task], size=(96, 128), seed=3)
    out = rp.model_outputs(deploy, SCOPES[task], size=(96, 128), seed=3)
    assert max(r.std().item() for r in ref) > 1e-2
    assert max_err(out, ref) <= TOL

    # load-time fusion: the deploy model loading the *training-form* file ends up identical
    deploy2 = mm_load(build(cfg, deploy=True), src)
    for k, v in deploy.state_dict().items():
        torch.testing.assert_close(deploy2.state_dict()[k], v, rtol=0, atol=0)


def test_released_detector_to_deploy(tmp_path):
    """The authors' COCO file (mmdet 2.28 form) re-parameterises as it is."""
    ckpt = rc.released_det('t')
    src = rc.save_as_numpy1(ckpt, tmp_path / 'maskrcnn1x_overlock_tiny_coco.pth')
    dst = tmp_path / 'deploy.pth'
    assert rp.main([str(src), str(dst), '--config', str(CONFIGS['det'])]) == 0
    new = read_checkpoint(str(dst))
    assert 'optimizer' not in new and new['meta']['CLASSES'] == ckpt['meta']['CLASSES']
    with torch.device('meta'):
        expected = OverLoCK('t', layout='det', deploy=True).state_dict()
    got = {k[len('backbone.'):]: v for k, v in new['state_dict'].items()
           if k.startswith('backbone.')}
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected.items()}


def test_refusals(tmp_path, capsys):
    deploy_file = rc.save(rc.released_cls('xt', reparam=True), tmp_path / 'reparam.pth')
    assert rp.main([str(deploy_file), str(tmp_path / 'x.pth')]) == 1
    assert 'already re-parameterised' in capsys.readouterr().err
    other = rc.save({'fc.weight': torch.zeros(2, 2)}, tmp_path / 'other.pth')
    assert rp.main([str(other), str(tmp_path / 'x.pth')]) == 1
    assert 'not a training-form OverLoCK checkpoint' in capsys.readouterr().err
    # a UniRepLKNet file has the same branch names, but its blocks fuse more than OverLoCK's
    from overlock_mm.backbones import UniRepLKNet
    with torch.device('meta'):
        shapes = UniRepLKNet('a').state_dict()
    unirep = rc.save({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items()},
                     tmp_path / 'unireplknet_a.pth')
    assert rp.main([str(unirep), str(tmp_path / 'x.pth')]) == 1
    assert 'stages.1.0.dwconv is a UniRepLKNet block' in capsys.readouterr().err
    # --config of another model: the strict load's failure, named as the likely mistake
    train_file = rc.save(rc.released_cls('xt'), tmp_path / 'xt.pth')
    assert rp.main([str(train_file), str(tmp_path / 'x.pth'), '--config',
                    str(CONFIGS['seg'])]) == 1
    err = capsys.readouterr().err
    assert f'does not load into the model of {CONFIGS["seg"]}' in err
    assert f'is {CONFIGS["seg"]} the config of {train_file}?' in err
    # deploy weights into a training-form model: refused, whatever the loading route
    backbone = OverLoCK('xt')
    sd = {k: v for k, v in read_checkpoint(str(deploy_file)).items()
          if not k.startswith(('head.', 'aux_head.'))}
    with pytest.raises(CheckpointError, match='deploy=True'):
        backbone.load_state_dict(sd)
