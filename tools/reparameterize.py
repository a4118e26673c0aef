#!/usr/bin/env python
"""Re-parameterise a trained OverLoCK checkpoint into its deploy form.

    python tools/reparameterize.py work_dirs/overlock-t/epoch_300.pth overlock-t_deploy.pth
    python tools/reparameterize.py maskrcnn1x_overlock_tiny_coco.pth \
        mask-rcnn_overlock-t_deploy.pth \
        --config configs/mmdet/mask-rcnn_overlock-t_fpn_8xb2-1x_coco.py

Works on any checkpoint holding OverLoCK backbones: the authors' ImageNet / COCO / ADE20K
releases, and classifiers, detectors and segmentors trained with our configs. Every
DilatedReparamBlock (a large depthwise conv plus dilated small ones, each with BatchNorm) is fused
into one large-kernel conv with bias named ``lk_origin``, by key names alone; nothing else
changes. Training state (optimizer, EMA copy, schedulers) is dropped; a bare state dict stays
bare (so ``overlock_*_in1k_224.pth`` becomes the ``*_reparam.pth`` layout).

Use the result with a deploy model: ``configs/mmpretrain/overlock-*_in1k_deploy.py``, or any
config with ``--cfg-options model.backbone.deploy=True``. (A deploy model also fuses training-form
weights itself when loading them, so this step is about smaller, faster-loading files.)

With ``--config``, the training-form and the deploy model of that config are built, loaded with
the two checkpoints and run on a random input; their outputs must agree within ``--atol``.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))


def model_outputs(model, scope: str, size=(128, 160), seed=0):
    """Deterministic outputs of a classifier / detector / segmentor on a random input."""
    import torch
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, *size, generator=g) * 255
    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor({'inputs': [x[0]], 'data_samples': None}, False)
        inputs = data['inputs']
        if scope == 'mmdet':
            return list(model.extract_feat(inputs))
        if scope == 'mmseg':
            meta = dict(img_shape=tuple(size), ori_shape=tuple(size), pad_shape=tuple(size))
            return [model.encode_decode(inputs, [meta])]
        return [model(inputs, mode='tensor')]


def verify(config, src, dst, atol=1e-4, log=print):
    """Outputs of the training-form model with ``src`` vs the deploy model with ``dst``."""
    from mmengine.runner.checkpoint import load_checkpoint

    from convert_checkpoint import build_model_from_config, load_config
    from overlock_mm.utils.checkpoint import CheckpointError
    scope = load_config(config).get('default_scope', 'mmengine')
    outs = []
    for ckpt, deploy in ((src, False), (dst, True)):
        model = build_model_from_config(config, device='cpu',
                                        cfg_options={'model.backbone.deploy': deploy})
        try:
            load_checkpoint(model, str(ckpt), map_location='cpu', strict=True, logger='silent')
        except (RuntimeError, KeyError) as e:  # strict loading: missing / unexpected / shapes
            if isinstance(e, CheckpointError):
                raise
            detail = ' '.join(str(e).split())[:300]
            raise CheckpointError(f'{ckpt} does not load into the model of {config} ({detail}); '
                                  f'is {config} the config of {src}?') from None
        outs.append(model_outputs(model, scope))
    # relative to the outputs' scale where it exceeds 1 (float32 rounding grows with it)
    err = max(((b - a).abs().max() / a.abs().max().clamp(min=1)).item() for a, b in zip(*outs))
    log(f'  verified with {Path(config).name}: max |training - deploy| = {err:.2e} '
        f'(tolerance {atol:g}, relative to the output scale where it exceeds 1).')
    if not err <= atol:
        raise CheckpointError(f'deploy outputs differ from the training-form outputs by {err:.2e} '
                              f'(> {atol:g}); is {config} the config of {src}?')
    return err


def reparameterize(src, dst, config=None, atol=1e-4, log=print):
    """Write the deploy form of ``src`` to ``dst``; returns the number of fused blocks."""
    import torch

    from overlock_mm.utils.checkpoint import read_checkpoint, reparameterize_checkpoint
    ckpt = read_checkpoint(str(src))
    new, n_blocks = reparameterize_checkpoint(ckpt)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save(new, str(dst))
    log(f'{src}: fused {n_blocks} DilatedReparamBlocks; saved {dst}.')
    if config is not None:
        verify(config, src, dst, atol, log)
    return n_blocks


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('src', help='training-form checkpoint (local file)')
    p.add_argument('dst', help='where to write the deploy checkpoint')
    p.add_argument('--config', help='config of the checkpoint: check deploy outputs against it')
    p.add_argument('--atol', type=float, default=1e-4, help='tolerance of the check (1e-4)')
    return p.parse_args(argv)


def main(argv=None) -> int:
    from overlock_mm.utils.checkpoint import CheckpointError
    args = parse_args(argv)
    try:
        reparameterize(args.src, args.dst, args.config, args.atol)
    except CheckpointError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
