#!/usr/bin/env python
"""Convert the authors' released OverLoCK checkpoints to mmpretrain / mmdet 3.x / mmseg 1.x.

    python tools/convert_checkpoint.py overlock_t_in1k_224.pth overlock-t_in1k_mmpretrain.pth
    python tools/convert_checkpoint.py maskrcnn1x_overlock_tiny_coco.pth mask-rcnn_overlock-t.pth
    python tools/convert_checkpoint.py upernet_overlock_tiny_ade20k.pth upernet_overlock-t.pth

The kind (ImageNet / re-parameterised ImageNet / COCO Mask R-CNN / ADE20K UperNet) and the variant
are recognised from the keys; anything else is refused with an explanation. The converted state
dict is then checked against the model of the matching config under ``configs/`` (or
``--config``): missing, unused and shape-mismatched keys are listed, and any of them is an error
unless ``--allow-partial``. Files are read with ``torch.load(weights_only=True)``.

Conversion is optional for using the released files: ``load_from=<released file>`` works in our
configs as-is (mmdet/mmseg keys are unchanged; the ImageNet layout is remapped at load time).
"""
import argparse
import copy
import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: released kind -> the config whose model a converted file is checked against.
DEFAULT_CONFIGS = {
    'cls': 'configs/mmpretrain/overlock-{arch}_8xb256_in1k.py',
    'cls_reparam': 'configs/mmpretrain/overlock-{arch}_8xb256_in1k_deploy.py',
    'det': 'configs/mmdet/mask-rcnn_overlock-{arch}_fpn_8xb2-1x_coco.py',
    'seg': 'configs/mmseg/upernet_overlock-{arch}_8xb2-160k_ade20k-512x512.py',
}


def default_config(kind: str, arch: str):
    path = ROOT / DEFAULT_CONFIGS[kind].format(arch=arch)
    return path if path.exists() else None


def _strip_pretrained(obj):
    """No ``Pretrained`` init (and so no download) while building a model to check keys."""
    if isinstance(obj, dict):
        if isinstance(obj.get('init_cfg'), dict) and obj['init_cfg'].get('type') == 'Pretrained':
            obj['init_cfg'] = None
        for v in obj.values():
            _strip_pretrained(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _strip_pretrained(v)


def _speed_up_external_configs() -> None:
    """mmengine resolves every ``mmdet::``/``mmseg::`` base config by parsing all metafiles of
    that package, once per reference; index them once per package instead (same result)."""
    import mmengine.config.utils as cu
    if getattr(cu._get_cfg_metainfo, '_overlock_cached', False):
        return
    original = cu._get_cfg_metainfo

    @functools.lru_cache(maxsize=None)
    def package_index(package_path):
        import os.path as osp

        from mmengine.fileio import load
        index = load(osp.join(package_path, '.mim', 'model-index.yml'))
        cfg_dict = {}
        for meta_path in index['Import']:
            for model_cfg in load(osp.join(package_path, '.mim', meta_path))['Models']:
                if 'Config' in model_cfg:
                    cfg_dict.setdefault(model_cfg['Config'].partition('/')[-1], model_cfg)
        return cfg_dict

    def cached(package_path, cfg_path):
        try:
            cfg_dict = package_index(package_path)
        except Exception:  # pragma: no cover - unusual package layout: mmengine's own code
            return original(package_path, cfg_path)
        if cfg_path not in cfg_dict:
            raise ValueError(f'Expected configs: {cfg_dict.keys()}, but got {cfg_path}')
        return cfg_dict[cfg_path]

    cached._overlock_cached = True
    cu._get_cfg_metainfo = cached


@functools.lru_cache(maxsize=None)
def _load_config(path: str):
    from mmengine.config import Config
    _speed_up_external_configs()
    return Config.fromfile(path)


def load_config(config, cfg_options=None):
    """A (cached, then copied) config with ``cfg_options`` merged and no ``Pretrained`` init."""
    cfg = copy.deepcopy(_load_config(str(Path(config).resolve())))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    _strip_pretrained(cfg.model)
    return cfg


def build_model_from_config(config, device='meta', cfg_options=None):
    """The config's model (``device='meta'``: shapes only, no memory, no initialisation)."""
    import importlib

    import torch
    from mmengine.registry import init_default_scope

    cfg = load_config(config, cfg_options)
    scope = cfg.get('default_scope', 'mmengine')
    init_default_scope(scope)
    registry = importlib.import_module(f'{scope}.registry')
    with torch.device(device):
        model = registry.MODELS.build(cfg.model)
    return model


@functools.lru_cache(maxsize=None)
def model_key_shapes(config):
    """``key -> shape`` of the config's model (built once per process, on the meta device)."""
    model = build_model_from_config(config, device='meta')
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_against_config(state_dict, config):
    """(missing, unused, mismatched) keys of ``state_dict`` for the config's model."""
    from overlock_mm.utils.convert import diff_keys
    return diff_keys(state_dict, model_key_shapes(str(Path(config).resolve())))


def convert(src, dst=None, kind='auto', config=None, verify=True, allow_partial=False,
            log=print):
    """Convert ``src`` (a released file) and write ``dst``; returns the converted checkpoint
    and its :class:`~overlock_mm.utils.convert.Layout`. Raises ``CheckpointError``."""
    import torch

    from overlock_mm.utils.checkpoint import CheckpointError, read_checkpoint
    from overlock_mm.utils.convert import convert_released

    ckpt = read_checkpoint(str(src))
    new, layout = convert_released(ckpt, source=Path(src).name)
    if kind != 'auto' and kind != layout.kind:
        raise CheckpointError(f'{src} is a {layout.kind!r} checkpoint (arch {layout.arch!r}), '
                              f'not {kind!r} as requested.')
    sd = new['state_dict']
    log(f'{src}: released {layout.kind} checkpoint, OverLoCK-{layout.arch.upper()}'
        f'{" (re-parameterised)" if layout.deploy else ""}, {len(sd)} tensors.')
    for note in layout.notes:
        log(f'  note: {note}')
    if verify:
        cfg = config or default_config(layout.kind, layout.arch)
        if cfg is None:
            log(f'  no config of ours for {layout.kind} / {layout.arch}; pass --config to check '
                'the keys against a model (skipped).')
        else:
            missing, unused, mismatched = check_against_config(sd, cfg)
            log(f'  checked against {Path(cfg).name}: {len(sd) - len(unused)} of '
                f'{len(sd)} tensors used; {len(missing)} missing, {len(unused)} unused, '
                f'{len(mismatched)} shape mismatches.')
            for title, keys in (('missing (model keys the file lacks)', missing),
                                ('unused (file keys the model lacks)', unused),
                                ('shape mismatches', mismatched)):
                if keys:
                    log(f'  {title}:')
                    for k in keys:
                        log(f'    {k}')
            if mismatched or (not allow_partial and (missing or unused)):
                raise CheckpointError(
                    f'{src} does not fit {Path(cfg).name}: {len(missing)} missing, '
                    f'{len(unused)} unused, {len(mismatched)} mismatched keys (listed above)'
                    + ('' if mismatched else '; --allow-partial writes it anyway') + '.')
    if dst is not None:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        torch.save(new, str(dst))
        log(f'  saved {dst}')
    return new, layout


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('src', help='released checkpoint (local file)')
    p.add_argument('dst', help='where to write the converted checkpoint')
    p.add_argument('--kind', default='auto', choices=['auto', 'cls', 'cls_reparam', 'det', 'seg'],
                   help='expected kind; refused if the file is another one (default: detect)')
    p.add_argument('--config', help='config whose model the result is checked against '
                   '(default: ours for the detected kind and variant)')
    p.add_argument('--no-verify', action='store_true', help='skip the check against a model')
    p.add_argument('--allow-partial', action='store_true',
                   help='write the result even with missing/unused keys (still listed)')
    return p.parse_args(argv)


def main(argv=None) -> int:
    from overlock_mm.utils.checkpoint import CheckpointError
    args = parse_args(argv)
    try:
        convert(args.src, args.dst, kind=args.kind, config=args.config,
                verify=not args.no_verify, allow_partial=args.allow_partial)
    except CheckpointError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
