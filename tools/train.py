"""Train an OverLoCK (or baseline) model with any of this repository's configs.

Works for mmdet, mmseg and mmpretrain configs alike (the config's ``default_scope`` decides).

    python tools/train.py configs/mmdet/cascade_overlock_s.py               # 1 process
    bash tools/dist_train.sh configs/mmdet/cascade_overlock_s.py 8          # 8 GPUs
    bash tools/slurm_train.sh PARTITION JOB configs/mmdet/cascade_overlock_s.py work_dirs/x
    python tools/train.py CONFIG --resume                                   # resume the latest
"""
import argparse
import os
import os.path as osp

# OpenMP threads that spin while waiting turn every parallel op into a stall as soon as another
# process shares the cores (measured on a 2-core VM: a backbone step went from 3.5 s to 38 s).
# PASSIVE makes waiting threads sleep instead. Must be set before torch loads; an explicit
# OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.registry import RUNNERS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import overlock_mm  # noqa: F401,E402  (registers modules and the safe-load allow-list)
from overlock_mm.utils.data_check import check_data_paths  # noqa: E402
from overlock_mm.utils.runtime import adapt_to_cpu  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description='Train a model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from the given checkpoint, or from the latest one in the work dir')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by (actual batch size / auto_scale_lr.base_batch_size)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, e.g. train_dataloader.batch_size=4')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    parser.add_argument('--skip-data-check', action='store_true',
                        help='do not check that the dataset paths exist before building the run')
    args = parser.parse_args()
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def build_cfg(args) -> Config:
    if not osp.isfile(args.config):
        raise FileNotFoundError(f'config file {args.config!r} not found.')
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    if args.work_dir:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    if args.amp:
        if cfg.optim_wrapper.get('type') == 'AmpOptimWrapper':
            print('AMP is already enabled in the config.')
        else:
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise KeyError('--auto-scale-lr needs `auto_scale_lr.base_batch_size` in the config.')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise FileNotFoundError(f'--resume checkpoint {args.resume!r} not found.')
        cfg.resume, cfg.load_from = True, args.resume
    if not args.skip_data_check:
        check_data_paths(cfg, 'train')
    return adapt_to_cpu(cfg, args.launcher)


def main():
    cfg = build_cfg(parse_args())
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    runner.paths_checked = True  # build_cfg checked them (or was told to skip): DataCheckRunner
    runner.train()


if __name__ == '__main__':
    main()
