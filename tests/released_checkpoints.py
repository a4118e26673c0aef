"""Synthetic checkpoints shaped exactly like the authors' released files (random values).

* Backbone keys/shapes: ``tests/data/official_keys/overlock_<arch>_<layout>.tsv`` (measured on
  the released files), never our own modules.
* Head keys of the COCO release: mmdet **2.28** Mask R-CNN + FPN as built by that version's
  ``configs/_base_/models/mask_rcnn_r50_fpn.py`` (FPN 256 ch / 5 outs; RPNHead with 3 anchors and
  sigmoid classification; Shared2FCBBoxHead 7x7x256 -> 1024 -> 1024, 80 classes + background;
  FCNMaskHead 4 convs, deconv upsample, 80 mask classes). Written out from the 2.28 module code,
  not from mmdet 3.x.
* Head keys of the ADE20K release: mmseg **0.30** ``upernet_r50.py`` (UPerHead 512 ch, pool
  scales 1,2,3,6, SyncBN; FCNHead 256 ch, 1 conv, on level 2), 150 classes.
* Containers/meta as mmcv 1.x's ``save_checkpoint`` writes them (``meta`` with mmcv_version,
  time, CLASSES (+PALETTE), config text, epoch/iter, hook_msgs with a numpy best score;
  ``state_dict`` OrderedDict with ``_metadata``; AdamW ``optimizer`` state), saved so that the
  numpy globals carry numpy 1.x module paths like files written in 2023-2024.
"""
import io
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).parent / 'data' / 'official_keys'
ARCHS = ('xt', 't', 's', 'b')
DENSE_ARCHS = ('t', 's', 'b')  # the COCO / ADE20K releases
LONG = {'xt': 'xtiny', 't': 'tiny', 's': 'small', 'b': 'base'}
#: the dense pyramid channels (C0, C1, C2 + C3/4, C3 + C3/4), docs/spec/ARCHITECTURE.md.
PYRAMID = {'xt': (56, 112, 340, 420), 't': (64, 128, 384, 640), 's': (64, 128, 448, 640),
           'b': (80, 160, 528, 720)}


def read_tsv(name: str) -> 'OrderedDict[str, tuple]':
    out = OrderedDict()
    for line in (DATA / f'{name}.tsv').read_text().splitlines():
        key, shape = line.split('\t')
        out[key] = () if shape == 'scalar' else tuple(int(s) for s in shape.split('x'))
    return out


def random_value(key: str, shape: tuple, g: torch.Generator) -> torch.Tensor:
    """A random tensor that keeps a deep network's activations finite and O(1)."""
    leaf = key.rsplit('.', 1)[-1]
    if leaf == 'num_batches_tracked':
        return torch.tensor(1000, dtype=torch.long)
    if leaf == 'running_var':
        return torch.rand(shape, generator=g) + 0.5
    if leaf == 'running_mean':
        return torch.randn(shape, generator=g) * 0.1
    if len(shape) == 1:  # norm affine / biases
        base = 1. if leaf == 'weight' else 0.
        return base + torch.randn(shape, generator=g) * 0.1
    if leaf in ('gamma', 'beta') or 'rpb' in leaf:
        return torch.randn(shape, generator=g) * 0.1
    if leaf == 'weight' and len(shape) == 4 and shape[1:] == (1, 1, 1):  # LayerScale
        return 1. + torch.randn(shape, generator=g) * 0.1
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return torch.randn(shape, generator=g) * (1. / fan_in) ** 0.5


def random_state_dict(shapes, seed=0, prefix='', meta=False) -> 'OrderedDict[str, torch.Tensor]':
    """Random values (``meta=True``: shapes only, on the meta device, for key-level checks)."""
    g = torch.Generator().manual_seed(seed)
    if meta:
        sd = OrderedDict((prefix + k, torch.empty(s, device='meta', dtype=torch.long if
                                                  k.endswith('num_batches_tracked') else None))
                         for k, s in shapes.items())
    else:
        sd = OrderedDict((prefix + k, random_value(k, s, g)) for k, s in shapes.items())
    sd._metadata = OrderedDict()  # as nn.Module.state_dict() / mmcv's weights_to_cpu keep it
    return sd


def randomize_(model: torch.nn.Module, seed=0) -> torch.nn.Module:
    """Overwrite every parameter/buffer of a model with :func:`random_value` values."""
    shapes = OrderedDict((k, tuple(v.shape)) for k, v in model.state_dict().items())
    model.load_state_dict(random_state_dict(shapes, seed))
    return model


# -------------------------------------------------------------------------------------- layouts
def bn(prefix, c):
    return [(f'{prefix}.weight', (c,)), (f'{prefix}.bias', (c,)), (f'{prefix}.running_mean', (c,)),
            (f'{prefix}.running_var', (c,)), (f'{prefix}.num_batches_tracked', ())]


def mmdet2_mask_rcnn_heads(arch: str, num_classes: int = 80) -> 'OrderedDict[str, tuple]':
    """neck / rpn_head / roi_head keys of an mmdet 2.28 Mask R-CNN + FPN (see module doc)."""
    c = 256
    keys = []
    # FPN: ConvModule(in, 256, 1) laterals and ConvModule(256, 256, 3) outputs, no norm (bias).
    for i, cin in enumerate(PYRAMID[arch]):
        keys += [(f'neck.lateral_convs.{i}.conv.weight', (c, cin, 1, 1)),
                 (f'neck.lateral_convs.{i}.conv.bias', (c,))]
    for i in range(4):
        keys += [(f'neck.fpn_convs.{i}.conv.weight', (c, c, 3, 3)),
                 (f'neck.fpn_convs.{i}.conv.bias', (c,))]
    # RPNHead._init_layers (2.28, num_convs=1): rpn_conv, rpn_cls (3 anchors x 1), rpn_reg (3 x 4).
    keys += [('rpn_head.rpn_conv.weight', (c, c, 3, 3)), ('rpn_head.rpn_conv.bias', (c,)),
             ('rpn_head.rpn_cls.weight', (3, c, 1, 1)), ('rpn_head.rpn_cls.bias', (3,)),
             ('rpn_head.rpn_reg.weight', (12, c, 1, 1)), ('rpn_head.rpn_reg.bias', (12,))]
    # Shared2FCBBoxHead: BBoxHead makes fc_cls (C + 1) and fc_reg (4 C), ConvFCBBoxHead shared_fcs.
    keys += [('roi_head.bbox_head.fc_cls.weight', (num_classes + 1, 1024)),
             ('roi_head.bbox_head.fc_cls.bias', (num_classes + 1,)),
             ('roi_head.bbox_head.fc_reg.weight', (4 * num_classes, 1024)),
             ('roi_head.bbox_head.fc_reg.bias', (4 * num_classes,)),
             ('roi_head.bbox_head.shared_fcs.0.weight', (1024, c * 7 * 7)),
             ('roi_head.bbox_head.shared_fcs.0.bias', (1024,)),
             ('roi_head.bbox_head.shared_fcs.1.weight', (1024, 1024)),
             ('roi_head.bbox_head.shared_fcs.1.bias', (1024,))]
    # FCNMaskHead: 4 x ConvModule(256, 256, 3), deconv upsample (ConvTranspose2d: in, out, k, k),
    # conv_logits 1x1 -> one mask per class.
    for i in range(4):
        keys += [(f'roi_head.mask_head.convs.{i}.conv.weight', (c, c, 3, 3)),
                 (f'roi_head.mask_head.convs.{i}.conv.bias', (c,))]
    keys += [('roi_head.mask_head.upsample.weight', (c, c, 2, 2)),
             ('roi_head.mask_head.upsample.bias', (c,)),
             ('roi_head.mask_head.conv_logits.weight', (num_classes, c, 1, 1)),
             ('roi_head.mask_head.conv_logits.bias', (num_classes,))]
    return OrderedDict(keys)


def mmseg0_upernet_heads(arch: str, num_classes: int = 150) -> 'OrderedDict[str, tuple]':
    """decode_head / auxiliary_head keys of an mmseg 0.30 UperNet (see module doc)."""
    c, ins = 512, PYRAMID[arch]
    keys = [('decode_head.conv_seg.weight', (num_classes, c, 1, 1)),
            ('decode_head.conv_seg.bias', (num_classes,))]
    # PPM: ModuleList of Sequential(AdaptiveAvgPool2d, ConvModule(C_last, 512, 1) + BN).
    for i in range(4):
        keys += [(f'decode_head.psp_modules.{i}.1.conv.weight', (c, ins[-1], 1, 1))]
        keys += bn(f'decode_head.psp_modules.{i}.1.bn', c)
    keys += [('decode_head.bottleneck.conv.weight', (c, ins[-1] + 4 * c, 3, 3))]
    keys += bn('decode_head.bottleneck.bn', c)
    for i in range(3):
        keys += [(f'decode_head.lateral_convs.{i}.conv.weight', (c, ins[i], 1, 1))]
        keys += bn(f'decode_head.lateral_convs.{i}.bn', c)
    for i in range(3):
        keys += [(f'decode_head.fpn_convs.{i}.conv.weight', (c, c, 3, 3))]
        keys += bn(f'decode_head.fpn_convs.{i}.bn', c)
    keys += [('decode_head.fpn_bottleneck.conv.weight', (c, 4 * c, 3, 3))]
    keys += bn('decode_head.fpn_bottleneck.bn', c)
    # FCNHead(num_convs=1, concat_input=False, channels=256) on level 2.
    keys += [('auxiliary_head.conv_seg.weight', (num_classes, 256, 1, 1)),
             ('auxiliary_head.conv_seg.bias', (num_classes,)),
             ('auxiliary_head.convs.0.conv.weight', (256, ins[2], 3, 3))]
    keys += bn('auxiliary_head.convs.0.bn', 256)
    return OrderedDict(keys)


# ---------------------------------------------------------------------------------- checkpoints
def released_cls(arch: str, reparam: bool = False, seed: int = 0, meta: bool = False):
    """``overlock_<arch>_in1k_224(_reparam).pth``: a bare state dict."""
    return random_state_dict(read_tsv(f'overlock_{arch}_cls' + ('_reparam' if reparam else '')),
                             seed, meta=meta)


def adamw_state(n_params: int = 3):
    """A genuine AdamW ``state_dict()`` (tensors, floats, bools, tuples, None)."""
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(n_params)]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.05)
    sum(p.sum() for p in params).backward()
    opt.step()
    for group in opt.param_groups:
        group['initial_lr'] = group['lr']
    return opt.state_dict()


def mmcv1_meta(task: str, arch: str):
    """``meta`` as mmcv 1.7's runner + mmdet 2.28 / mmseg 0.30 ``train.py`` write it."""
    meta = dict(
        env_info='sys.platform: linux\nPython: 3.10.14\nCUDA available: True\n'
                 'PyTorch: 2.3.1+cu121\nMMCV: 1.7.2\n',
        config='model = dict(\n    type=...)\n',  # cfg.pretty_text
        seed=0, mmcv_version='1.7.2', time='Tue Jan 14 10:21:09 2025',
        hook_msgs=dict(last_ckpt='/work_dirs/latest.pth'))
    if task == 'det':
        from mmdet.datasets import CocoDataset
        meta.update(exp_name=f'mask_rcnn_overlock_{arch}_in1k_fpn_1x_coco.py',
                    mmdet_version='2.28.2', CLASSES=tuple(CocoDataset.METAINFO['classes']),
                    epoch=12, iter=87960)
    else:
        from mmseg.datasets import ADE20KDataset
        info = ADE20KDataset.METAINFO
        meta.update(exp_name=f'upernet_overlock_{LONG[arch]}_ade20k_8xb2.py',
                    mmseg_version='0.30.0', CLASSES=tuple(info['classes']),
                    PALETTE=[list(p) for p in info['palette']], epoch=1, iter=160000)
        # EvalHook(save_best='mIoU') stores numpy scalars from the metric.
        meta['hook_msgs'].update(best_score=np.float64(0.503), best_ckpt='/work_dirs/best.pth')
    return meta


def released_det(arch: str, seed: int = 0, optimizer: bool = True, meta: bool = False):
    """``maskrcnn{1x,3x}_overlock_<long>_coco.pth`` as mmdet 2.28 saves it."""
    shapes = OrderedDict(('backbone.' + k, s) for k, s in read_tsv(f'overlock_{arch}_det').items())
    shapes.update(mmdet2_mask_rcnn_heads(arch))
    ckpt = {'meta': mmcv1_meta('det', arch),
            'state_dict': random_state_dict(shapes, seed, meta=meta)}
    if optimizer:
        ckpt['optimizer'] = adamw_state()
    return ckpt


def released_seg(arch: str, seed: int = 0, optimizer: bool = True, meta: bool = False):
    """``upernet_overlock_<long>_ade20k.pth`` as mmseg 0.30 saves it."""
    shapes = OrderedDict(('backbone.' + k, s) for k, s in read_tsv(f'overlock_{arch}_seg').items())
    shapes.update(mmseg0_upernet_heads(arch))
    ckpt = {'meta': mmcv1_meta('seg', arch),
            'state_dict': random_state_dict(shapes, seed, meta=meta)}
    if optimizer:
        ckpt['optimizer'] = adamw_state()
    return ckpt


def save_as_numpy1(obj, path) -> Path:
    """``torch.save`` with the pickle's numpy globals renamed to numpy 1.x module paths
    (``numpy.core.multiarray``), as in files written before numpy 2."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith('data.pkl'):
                data = data.replace(b'numpy._core.multiarray', b'numpy.core.multiarray')
            dst.writestr(info, data)
    return Path(path)


def save(obj, path) -> Path:
    torch.save(obj, str(path))
    return Path(path)


def pickle_globals(path) -> set:
    """The GLOBAL references of a saved checkpoint's pickle (to check what a file needs)."""
    import pickletools
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith('data.pkl'))
        data = z.read(name)
    out = set()
    for op, arg, _ in pickletools.genops(data):
        if op.name == 'GLOBAL':
            out.add(arg.replace(' ', '.'))
    return out


__all__ = ['ARCHS', 'DENSE_ARCHS', 'PYRAMID', 'read_tsv', 'random_value', 'random_state_dict',
           'randomize_', 'mmdet2_mask_rcnn_heads', 'mmseg0_upernet_heads', 'released_cls',
           'released_det', 'released_seg', 'save_as_numpy1', 'save', 'pickle_globals',
           'adamw_state', 'mmcv1_meta']
