"""Evaluate a checkpoint with any of this repository's configs.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--show-dir DIR]
    bash tools/dist_test.sh CONFIG CHECKPOINT 8

Released checkpoints of the authors load directly where the config allows it (see
docs/model_zoo.md); others go through tools/convert_checkpoint.py first.
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

import overlock_mm  # noqa: F401,E402
from overlock_mm.utils.data_check import check_data_paths  # noqa: E402
from overlock_mm.utils.runtime import adapt_to_cpu  # noqa: E402


def enable_visualization(cfg: Config, show_dir: str) -> None:
    """Each library's visualisation hook takes its output folder differently."""
    hooks = cfg.default_hooks
    if cfg.default_scope == 'mmdet':
        hooks.visualization.update(draw=True, test_out_dir=osp.abspath(show_dir))
    elif cfg.default_scope == 'mmseg':
        hooks.visualization.update(draw=True)
        cfg.visualizer.save_dir = show_dir
    else:  # mmpretrain
        hooks.visualization = dict(type='VisualizationHook', enable=True, out_dir=show_dir)


def parse_args():
    parser = argparse.ArgumentParser(description='Test (and eval) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save logs and metrics')
    parser.add_argument('--out', help='dump predictions to this pickle file')
    parser.add_argument('--show-dir', help='save images with predictions drawn to this dir')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    parser.add_argument('--skip-data-check', action='store_true',
                        help='do not check that the dataset paths exist before building the run')
    args = parser.parse_args()
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def main():
    args = parse_args()
    for what, path in (('config', args.config), ('checkpoint', args.checkpoint)):
        if not osp.isfile(path):
            raise FileNotFoundError(f'{what} file {path!r} not found.')
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or osp.join(
        './work_dirs', osp.splitext(osp.basename(args.config))[0])
    cfg.load_from = args.checkpoint
    if args.show_dir:
        enable_visualization(cfg, args.show_dir)
    if not args.skip_data_check:
        check_data_paths(cfg, 'test')
    cfg = adapt_to_cpu(cfg, args.launcher)
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    runner.paths_checked = True  # checked above (or told to skip): DataCheckRunner need not
    if args.out:
        from mmengine.evaluator import DumpResults
        runner.test_evaluator.metrics.append(DumpResults(out_file_path=args.out))
    runner.test()


if __name__ == '__main__':
    main()
