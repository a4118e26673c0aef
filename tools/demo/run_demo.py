"""The embedded demo: synthetic data -> train on CPU with the OpenMMLab runner -> real metric.

    python tools/demo/run_demo.py det     # Cascade Mask R-CNN + OverLoCK-XT: COCO bbox/segm AP
    python tools/demo/run_demo.py seg     # UperNet + OverLoCK-XT: mIoU (ADE20K format)
    python tools/demo/run_demo.py cls     # OverLoCK-XT classifier: top-1 (image folder)

Each task generates its data (deterministic) if missing, trains the demo config (which inherits
the real recipe and changes only data, scale, schedule and the variant), evaluates with the
library's own metric, prints it, and saves an image with the predictions drawn.
"""
import argparse
import json
import os
import os.path as osp
import sys
import time
from pathlib import Path

# Sleeping (not spinning) OpenMP waiters: see tools/train.py. Set before torch loads.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / 'tools' / 'demo'))

from generate_data import generate  # noqa: E402

TASKS = {
    # detection: 256 training images, so that 300 iterations x 2 images rarely repeat one
    'det': dict(config='configs/demo/cascade-mask-rcnn_overlock-xt_demo.py', data='coco',
                num_train=256,
                metrics=('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50')),
    'seg': dict(config='configs/demo/upernet_overlock-xt_demo.py', data='ade', num_train=64,
                metrics=('mIoU', 'aAcc')),
    'cls': dict(config='configs/demo/overlock-xt_demo.py', data='cls', num_train=64,
                metrics=('accuracy/top1',)),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('task', choices=list(TASKS))
    parser.add_argument('--data-root', default='data/demo', help='where the synthetic data goes')
    parser.add_argument('--work-dir', help='defaults to work_dirs/demo_<task>')
    parser.add_argument('--iters', type=int, help='override the number of training iterations')
    parser.add_argument('--num-train', type=int,
                        help='training images to generate (default: 256 det, 64 seg / cls)')
    parser.add_argument('--num-val', type=int, default=16)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--init-backbone', metavar='CKPT',
                        help='initialise the backbone from a checkpoint (e.g. the cls demo\'s, as '
                             'ImageNet weights initialise the real recipes)')
    return parser.parse_args()


def draw_predictions(task: str, cfg, runner, data_root: Path, out_file: Path) -> None:
    """Run the trained model on one validation image and save it with predictions drawn."""
    import mmcv
    import torch
    from mmengine.dataset import Compose
    model = runner.model
    model.eval()
    if task == 'det':
        from mmdet.apis import inference_detector
        from mmdet.visualization import DetLocalVisualizer
        img_path = sorted((data_root / 'coco' / 'val').glob('*.png'))[0]
        model.cfg = cfg
        result = inference_detector(model, str(img_path))
        vis = DetLocalVisualizer()
        vis.dataset_meta = runner.val_dataloader.dataset.metainfo
        vis.add_datasample('demo', mmcv.imread(str(img_path), channel_order='rgb'), result,
                           draw_gt=False, pred_score_thr=0.5, out_file=str(out_file))
    elif task == 'seg':
        from mmseg.apis import inference_model
        from mmseg.visualization import SegLocalVisualizer
        img_path = sorted((data_root / 'ade' / 'images' / 'validation').glob('*.jpg'))[0]
        model.cfg = cfg
        result = inference_model(model, str(img_path))
        vis = SegLocalVisualizer(alpha=0.6)
        vis.dataset_meta = runner.val_dataloader.dataset.metainfo
        vis.add_datasample('demo', mmcv.imread(str(img_path), channel_order='rgb'), result,
                           draw_gt=False, out_file=str(out_file))
    else:
        from mmpretrain.visualization import UniversalVisualizer
        img_path = sorted((data_root / 'cls' / 'val').rglob('*.png'))[0]
        pipeline = Compose(cfg.test_dataloader.dataset.pipeline)
        data = pipeline(dict(img_path=str(img_path)))
        with torch.no_grad():
            result = model.test_step(dict(inputs=[data['inputs']],
                                          data_samples=[data['data_samples']]))[0]
        vis = UniversalVisualizer()
        vis.dataset_meta = runner.val_dataloader.dataset.metainfo
        vis.visualize_cls(mmcv.imread(str(img_path), channel_order='rgb'), result,
                          draw_gt=False, out_file=str(out_file))


def main():
    args = parse_args()
    task = TASKS[args.task]
    data_root = Path(args.data_root)
    t0 = time.time()
    generate(data_root, tasks=(task['data'],), num_train=args.num_train or task['num_train'],
             num_val=args.num_val)

    from mmengine.config import Config
    from mmengine.runner import Runner

    import overlock_mm  # noqa: F401
    from overlock_mm.utils.runtime import adapt_to_cpu

    cfg = Config.fromfile(str(ROOT / task['config']))
    cfg.work_dir = args.work_dir or f'work_dirs/demo_{args.task}'
    cfg.randomness = dict(seed=args.seed, deterministic=False)
    _set_data_root(cfg, data_root / task['data'])
    if args.iters:
        _set_iters(cfg, args.iters)
    if args.init_backbone:
        cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint=args.init_backbone)
    cfg = adapt_to_cpu(cfg, 'none')
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = runner.test()
    out_file = Path(cfg.work_dir) / f'demo_{args.task}_predictions.png'
    draw_predictions(args.task, cfg, runner, data_root, out_file)

    shown, missing = metric_summary(task['metrics'], metrics)
    iters = cfg.train_cfg.max_iters
    summary = dict(task=args.task, config=task['config'], metrics=shown, missing=missing,
                   iters=iters, minutes=round((time.time() - t0) / 60, 1),
                   predictions=str(out_file))
    with open(Path(cfg.work_dir) / 'demo_summary.json', 'w') as f:
        json.dump(summary, f, indent=2)
    print('\n' + '=' * 72)
    if shown:
        print(f'demo {args.task}: ' + ', '.join(f'{k} = {v}' for k, v in shown.items()))
    if missing:
        print(f'demo {args.task}: ' + missing_metrics_hint(args.task, missing, iters))
    print(f'trained {iters} iterations in {summary["minutes"]} min (CPU); '
          f'predictions drawn to {out_file}')
    print('=' * 72)


def metric_summary(wanted, metrics):
    """The wanted metrics the evaluator reported (rounded), and the names of those it did not."""
    shown = {k: round(float(metrics[k]), 4) for k in wanted if k in metrics}
    return shown, [k for k in wanted if k not in metrics]


def missing_metrics_hint(task: str, missing, iters: int) -> str:
    """Why an evaluator reports nothing, and what to do about it.

    mmdet's CocoMetric returns no AP at all (and logs "The testing results of the whole dataset
    is empty") when the model predicted no box on any validation image -- what a detector does
    after too few iterations, not an error of the pipeline."""
    line = f'no {", ".join(missing)} reported'
    if task == 'det':
        return (f'{line}: after {iters} iterations the detector predicts no box on the validation '
                'images, so COCO AP is undefined (mmdet logs "The testing results of the whole '
                'dataset is empty"). Train longer: the default 300 iterations reach bbox mAP '
                '~0.85, --iters 150 ~0.56 (docs/demo.md).')
    return f'{line} by the evaluator: see its log lines above.'


def _set_data_root(cfg, root: Path) -> None:
    """Point every dataloader (and the COCO evaluator) at ``root``."""
    root = str(root) + '/'
    for name in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        ds = cfg[name].dataset
        ds.data_root = root
    for name in ('val_evaluator', 'test_evaluator'):
        ev = cfg.get(name)
        if isinstance(ev, dict) and 'ann_file' in ev:
            ev.ann_file = osp.join(root, osp.relpath(ev.ann_file, cfg.data_root))


def _set_iters(cfg, iters: int) -> None:
    """Shorten the run to ``iters``: schedulers end there, and those that would only begin
    after it (the decay after a warm-up longer than the run) are dropped -- mmengine refuses a
    scheduler whose end is not after its begin."""
    cfg.train_cfg.max_iters = iters
    cfg.train_cfg.val_interval = iters
    kept = []
    for sched in cfg.param_scheduler:
        if sched.get('begin', 0) >= iters:
            continue
        if sched.get('end', 0) > iters:
            sched.end = iters
        if 'milestones' in sched:
            sched.milestones = [int(iters * 0.8)]
        kept.append(sched)
    cfg.param_scheduler = kept


if __name__ == '__main__':
    main()
