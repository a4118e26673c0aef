"""The authors' released checkpoints: where they are, how to recognise them, how to convert them.

Released files (GitHub release ``v1`` of LMMMEng/OverLoCK, :data:`RELEASE_URL`):

=====================  ================================================  =====================
kind                   file                                              content
=====================  ================================================  =====================
``'cls'``              ``overlock_{xt,t,s,b}_in1k_224.pth``              bare timm state dict
``'cls_reparam'``      ``overlock_{xt,t,s,b}_in1k_224_reparam.pth``      same, re-parameterised
``'det'``              ``maskrcnn{1x,3x}_overlock_{tiny,small,base}      mmdet 2.28 checkpoint
                       _coco.pth``
``'seg'``              ``upernet_overlock_{tiny,small,base}_ade20k.pth``  mmseg 0.30 checkpoint
=====================  ================================================  =====================

Key mappings:

* Backbone keys never change: our :class:`~overlock_mm.OverLoCK` reproduces the released names
  in all layouts (``tests/data/official_keys``).
* ImageNet: the classifier sits at ``head.*`` / ``aux_head.*`` of a bare state dict; in an
  mmpretrain ``ImageClassifier`` the backbone is under ``backbone.`` and our
  :class:`~overlock_mm.heads.OverLoCKClsHead` under ``head.`` (holding ``head`` and
  ``aux_head``).
* COCO (mmdet 2.28 -> 3.x) and ADE20K (mmseg 0.30 -> 1.x): the parameter names of the modules
  these checkpoints contain are the same in both generations (FPN ``neck.lateral_convs/fpn_convs
  .<i>.conv``, RPNHead ``rpn_conv/rpn_cls/rpn_reg``, Shared2FCBBoxHead ``shared_fcs/fc_cls/
  fc_reg``, FCNMaskHead ``convs/upsample/conv_logits``; UPerHead ``psp_modules/bottleneck/
  lateral_convs/fpn_convs/fpn_bottleneck/conv_seg``, FCNHead ``convs/conv_seg``), with the same
  shapes and class orders (background last in mmdet since 2.0). Conversion therefore keeps the
  state dict, turns the 2.x meta (``CLASSES``/``PALETTE``) into mmengine's ``dataset_meta`` and
  drops the training state (optimizer). The key lists are checked against our configs' models
  when converting (``tools/convert_checkpoint.py``) and in ``tests/test_checkpoints.py``.
"""
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import torch

#: where the authors' release lives; every URL of the model zoo is built from it.
RELEASE_URL = 'https://github.com/LMMMEng/OverLoCK/releases/download/v1/'
#: our arch names -> the words the released detection/segmentation file names use.
ARCH_LONG_NAMES = {'xt': 'xtiny', 't': 'tiny', 's': 'small', 'b': 'base'}
#: what a released file is (see the module docstring).
RELEASED_KINDS = ('cls', 'cls_reparam', 'det', 'seg')
#: layouts we recognise that are already converted (nothing to do).
CONVERTED_KINDS = ('mmpretrain',)

RELEASED_HEAD_PREFIXES = ('head.', 'aux_head.')
#: non-backbone modules of the released Mask R-CNN / UperNet checkpoints.
DET_PREFIXES = ('neck.', 'rpn_head.', 'roi_head.')
SEG_PREFIXES = ('decode_head.', 'auxiliary_head.')


def released_filename(kind: str, arch: str, schedule: str = '1x') -> str:
    """File name of a released checkpoint.

    Args:
        kind: one of :data:`RELEASED_KINDS`.
        arch: ``'xt'``, ``'t'``, ``'s'`` or ``'b'``.
        schedule: ``'1x'`` or ``'3x'`` (detection only).
    """
    if arch not in ARCH_LONG_NAMES:
        raise ValueError(f'unknown arch {arch!r}; valid: {", ".join(ARCH_LONG_NAMES)}.')
    if kind == 'cls':
        return f'overlock_{arch}_in1k_224.pth'
    if kind == 'cls_reparam':
        # Our best guess of the re-parameterised files' names (the `*_reparam.pth` assets).
        return f'overlock_{arch}_in1k_224_reparam.pth'
    if kind == 'det':
        if schedule not in ('1x', '3x'):
            raise ValueError(f"unknown detection schedule {schedule!r}; valid: '1x', '3x'.")
        return f'maskrcnn{schedule}_overlock_{ARCH_LONG_NAMES[arch]}_coco.pth'
    if kind == 'seg':
        return f'upernet_overlock_{ARCH_LONG_NAMES[arch]}_ade20k.pth'
    raise ValueError(f'unknown kind {kind!r}; valid: {", ".join(RELEASED_KINDS)}.')


def released_url(kind: str, arch: str, schedule: str = '1x') -> str:
    """URL of a released checkpoint (:data:`RELEASE_URL` + :func:`released_filename`)."""
    return RELEASE_URL + released_filename(kind, arch, schedule)


# ----------------------------------------------------------------------------- cls <-> mmpretrain
def is_released_cls_layout(sd: Dict[str, torch.Tensor]) -> bool:
    """A bare classification state dict of the release (no ``backbone.`` wrapping)."""
    return 'patch_embed1.0.weight' in sd and not any(k.startswith('backbone.') for k in sd)


def released_cls_to_mmpretrain(sd: Dict[str, torch.Tensor]) -> 'OrderedDict[str, torch.Tensor]':
    """``patch_embed1.*`` -> ``backbone.patch_embed1.*``; ``head.*`` -> ``head.head.*``;
    ``aux_head.*`` -> ``head.aux_head.*``."""
    out = OrderedDict()
    for k, v in sd.items():
        out[('head.' + k) if k.startswith(RELEASED_HEAD_PREFIXES) else ('backbone.' + k)] = v
    return out


def mmpretrain_to_released_cls(sd: Dict[str, torch.Tensor]) -> 'OrderedDict[str, torch.Tensor]':
    """The inverse of :func:`released_cls_to_mmpretrain`."""
    out = OrderedDict()
    for k, v in sd.items():
        if k.startswith('backbone.'):
            out[k[len('backbone.'):]] = v
        elif k.startswith('head.'):
            out[k[len('head.'):]] = v
        else:
            raise KeyError(f'unexpected key {k!r} in an OverLoCK ImageClassifier state dict.')
    return out


# ------------------------------------------------------------------------------ layout detection
@dataclass
class Layout:
    """What a checkpoint is: ``kind`` (:data:`RELEASED_KINDS` or :data:`CONVERTED_KINDS`), the
    OverLoCK ``arch``, the backbone ``layout`` (``'cls'``/``'det'``/``'seg'``), whether it is
    re-parameterised (``deploy``) and the prefix of the backbone keys."""
    kind: str
    arch: str
    layout: str
    deploy: bool
    backbone_prefix: str
    notes: List[str] = field(default_factory=list)


@lru_cache(maxsize=None)
def backbone_key_shapes(arch: str, layout: str, deploy: bool) -> Dict[str, Tuple[int, ...]]:
    """``key -> shape`` of our OverLoCK backbone (built on the meta device: no memory, fast)."""
    from ..backbones.overlock import OverLoCK
    with torch.device('meta'):
        model = OverLoCK(arch, layout=layout, deploy=deploy)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _strip(sd, prefix):
    return OrderedDict((k[len(prefix):], v) for k, v in sd.items() if k.startswith(prefix))


def diff_keys(sd: Dict[str, torch.Tensor], expected: Dict[str, Tuple[int, ...]]):
    """(missing, unexpected, shape-mismatched) keys of ``sd`` against ``expected`` shapes."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [f'{k}: {tuple(sd[k].shape)} vs {expected[k]}' for k in expected
                  if k in sd and tuple(sd[k].shape) != expected[k]]
    return missing, unexpected, mismatched


def _arch_signature(arch: dict):
    return (tuple(arch['embed_dims']), tuple(arch['depths']), tuple(arch['sub_depths']))


def _sd_signature(sd: Dict[str, torch.Tensor]):
    """(embed dims, depths, sub depths) as the keys of a backbone state dict show them."""
    def width(k, dim):
        return sd[k].shape[dim] if k in sd else None

    def count(name):
        return len({k.split('.')[1] for k in sd if k.startswith(name + '.')})

    dims = (width('patch_embed2.0.weight', 1), width('patch_embed3.0.weight', 1),
            width('patch_embed4.0.weight', 1), width('patch_embed4.0.weight', 0))
    return (dims, tuple(count(f'blocks{i}') for i in range(1, 5)),
            (count('sub_blocks3'), count('sub_blocks4')))


def match_backbone_arch(backbone_sd: Dict[str, torch.Tensor], layout: str, deploy: bool,
                        what: str = 'checkpoint') -> str:
    """The arch whose backbone keys and shapes equal ``backbone_sd`` exactly.

    Raises:
        CheckpointError: naming the closest arch and its differences.
    """
    from ..backbones.overlock import OverLoCK
    from .checkpoint import CheckpointError
    best = None
    # Check the variant whose widths and depths the keys show first (building models is slow).
    archs = sorted(OverLoCK.arch_settings,
                   key=lambda a: _arch_signature(OverLoCK.arch_settings[a]) !=
                   _sd_signature(backbone_sd))
    for arch in archs:
        missing, unexpected, mismatched = diff_keys(backbone_sd,
                                                    backbone_key_shapes(arch, layout, deploy))
        if not (missing or unexpected or mismatched):
            return arch
        score = len(missing) + len(unexpected) + len(mismatched)
        if best is None or score < best[0]:
            best = (score, arch, missing, unexpected, mismatched)
    _, arch, missing, unexpected, mismatched = best
    details = []
    if mismatched:
        details.append(f'{len(mismatched)} shape mismatches, e.g. {mismatched[0]}')
    if missing:
        details.append(f'{len(missing)} missing keys, e.g. {missing[:3]}')
    if unexpected:
        details.append(f'{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}')
    form = 're-parameterised ' if deploy else ''
    raise CheckpointError(
        f'{what}: the backbone matches no OverLoCK variant in the {form}{layout!r} layout; '
        f'closest is {arch!r} with {"; ".join(details)}.')


def _has(sd, prefixes):
    return any(k.startswith(prefixes) for k in sd)


def _describe(sd) -> str:
    heads = sorted({k.split('.')[0] for k in sd})
    return f'{len(sd)} tensors, top-level modules: {", ".join(heads[:12])}' + \
        (' ...' if len(heads) > 12 else '')


def detect_layout(sd: Dict[str, torch.Tensor], what: str = 'checkpoint') -> Layout:
    """Recognise one of the released layouts (or an already converted mmpretrain one).

    Args:
        sd: a flat state dict (:func:`~overlock_mm.utils.checkpoint.extract_state_dict`).
        what: how to name the file in error messages.

    Raises:
        CheckpointError: for anything else, saying which layouts are known and what was found.
    """
    from .checkpoint import CheckpointError, is_reparameterized
    known = ('known layouts: the ImageNet release (bare state dict with patch_embed1.* ... '
             'head.*, aux_head.*; training or re-parameterised form), the COCO Mask R-CNN release '
             '(mmdet 2.x: backbone.*, neck.*, rpn_head.*, roi_head.*) and the ADE20K UperNet '
             'release (mmseg 0.x: backbone.*, decode_head.*, auxiliary_head.*)')
    if not sd:
        raise CheckpointError(f'{what} holds no tensors; {known}.')
    if 'backbone.patch_embed1.0.weight' in sd:
        prefix = 'backbone.'
        if _has(sd, SEG_PREFIXES):
            kind, layout = 'seg', 'seg'
        elif _has(sd, DET_PREFIXES):
            kind, layout = 'det', 'det'
        elif 'head.head.0.weight' in sd:
            kind, layout = 'mmpretrain', 'cls'
        else:
            raise CheckpointError(f'{what} has OverLoCK backbone keys under backbone. but no '
                                  f'known head ({_describe(sd)}); {known}.')
    elif 'patch_embed1.0.weight' in sd:
        prefix, layout = '', 'cls'
        kind = 'cls'
        if _has(sd, ('extra_norm.', 'h_proj.')):
            layout = 'det' if _has(sd, ('h_proj.',)) else 'seg'
            kind = 'backbone_' + layout
    else:
        raise CheckpointError(f'{what} is not an OverLoCK checkpoint ({_describe(sd)}); {known}.')

    backbone = _strip(sd, prefix) if prefix else OrderedDict(
        (k, v) for k, v in sd.items() if not k.startswith(RELEASED_HEAD_PREFIXES))
    deploy = is_reparameterized(backbone)
    arch = match_backbone_arch(backbone, layout, deploy, what)
    notes = []
    if kind == 'cls':
        if deploy:
            kind = 'cls_reparam'
        if not _has(sd, ('head.',)):
            notes.append('no classifier head (head.*) in the file: a backbone-only state dict.')
    elif kind.startswith('backbone_'):
        raise CheckpointError(f'{what} is a bare OverLoCK backbone in the {layout!r} layout '
                              f'(arch {arch!r}) without detector/segmentor heads; it can be '
                              "loaded as the backbone's init_cfg=dict(type='Pretrained', ...) but "
                              f'is not a released file to convert; {known}.')
    return Layout(kind, arch, layout, deploy, prefix, notes)


# ------------------------------------------------------------------------------------ conversion
def _plain_meta(meta) -> dict:
    """The plain scalar/str entries of a 2.x ``meta`` (provenance), without the config text."""
    keep = {}
    for k, v in (meta or {}).items():
        if k in ('CLASSES', 'PALETTE', 'config'):
            continue
        if isinstance(v, (str, int, float, bool)) or v is None:
            keep[k] = v
    return keep


def _dataset_meta(kind: str, meta: dict) -> dict:
    meta = meta or {}
    out = {}
    classes = meta.get('CLASSES') or (meta.get('dataset_meta') or {}).get('classes')
    palette = meta.get('PALETTE') or (meta.get('dataset_meta') or {}).get('palette')
    if classes is not None:
        out['classes'] = tuple(classes)
    if palette is not None:
        out['palette'] = [tuple(int(c) for c in p) for p in palette]
    try:  # fill in the dataset's own metainfo when the library is installed
        if kind == 'det':
            from mmdet.datasets import CocoDataset as ds
        elif kind == 'seg':
            from mmseg.datasets import ADE20KDataset as ds
        else:
            from mmpretrain.datasets.categories import IMAGENET_CATEGORIES
            out.setdefault('classes', tuple(IMAGENET_CATEGORIES))
            return out
        info = ds.METAINFO
        if 'classes' not in out or tuple(out['classes']) == tuple(info['classes']):
            out.setdefault('classes', tuple(info['classes']))
            if 'palette' in info:
                out.setdefault('palette', [tuple(p) for p in info['palette']])
    except ImportError:  # pragma: no cover - library not installed
        pass
    return out


def convert_released(ckpt, layout: Optional[Layout] = None, source: str = 'checkpoint'):
    """Convert a released checkpoint (as read by ``read_checkpoint``) to our OpenMMLab 2.x form.

    Returns:
        (new checkpoint ``{'meta': ..., 'state_dict': ...}``, :class:`Layout`)
    """
    from .checkpoint import CheckpointError, extract_state_dict
    sd = extract_state_dict(ckpt)
    layout = layout or detect_layout(sd, source)
    old_meta = ckpt.get('meta') if isinstance(ckpt, dict) and isinstance(
        ckpt.get('meta'), dict) else {}
    if layout.kind in ('cls', 'cls_reparam'):
        new_sd = released_cls_to_mmpretrain(sd)
    elif layout.kind in ('det', 'seg'):
        new_sd = OrderedDict(sd)
    elif layout.kind in CONVERTED_KINDS:
        raise CheckpointError(f'{source} is already in the {layout.kind} layout (arch '
                              f'{layout.arch!r}); use it directly, nothing to convert.')
    else:  # pragma: no cover - detect_layout returns known kinds only
        raise CheckpointError(f'{source}: unsupported kind {layout.kind!r}.')
    task = layout.kind.split('_')[0]
    meta = dict(
        dataset_meta=_dataset_meta(task, old_meta),
        overlock=dict(arch=layout.arch, released_kind=layout.kind, deploy=layout.deploy,
                      converted_from=str(source)),
    )
    if old_meta:
        meta['overlock']['source_meta'] = _plain_meta(old_meta)
    return {'meta': meta, 'state_dict': new_sd}, layout
