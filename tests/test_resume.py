"""An interrupted run resumes (tools/train.py --resume) on torch >= 2.6, whose torch.load
defaults to weights_only=True; mmengine's checkpoints load thanks to overlock_mm's allow-list
(unit-tested in tests/test_safe_load.py)."""
import sys
from argparse import Namespace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools' / 'demo'))
from generate_data import generate  # noqa: E402
from tool_utils import load_tool  # noqa: E402


def load_train_module():
    return load_tool('tools/train.py', 'olk_train')


def run(train, tmp_path, iters, resume=None):
    from mmengine.runner import Runner
    opts = {
        'train_dataloader.dataset.data_root': f'{tmp_path}/data/cls/',
        'val_dataloader.dataset.data_root': f'{tmp_path}/data/cls/',
        'train_dataloader.batch_size': 2,
        'train_cfg.max_iters': iters, 'train_cfg.val_interval': 1000,
        'param_scheduler': [dict(type='ConstantLR', factor=1.0, by_epoch=False)],
        'default_hooks.checkpoint.interval': 2,
        'default_hooks.checkpoint.max_keep_ckpts': 3,
    }
    args = Namespace(config=str(ROOT / 'configs/demo/overlock-xt_demo.py'), skip_data_check=False,
                     work_dir=str(tmp_path / 'work'), resume=resume, amp=False,
                     auto_scale_lr=False, cfg_options=opts, launcher='none')
    runner = Runner.from_cfg(train.build_cfg(args))
    runner.train()
    return runner


def adam_steps(path):
    ckpt = torch.load(path, weights_only=True)
    return {int(s['step']) for s in ckpt['optimizer']['state'].values()}


def test_interrupted_run_resumes(tmp_path):
    generate(tmp_path / 'data', tasks=('cls',), num_train=6, num_val=3, size=96)
    train = load_train_module()
    run(train, tmp_path, iters=2)  # the "interrupted" run: its last checkpoint is iter_2.pth
    work = tmp_path / 'work'
    assert (work / 'iter_2.pth').exists() and adam_steps(work / 'iter_2.pth') == {2}

    runner = run(train, tmp_path, iters=4, resume='auto')
    assert runner.iter == 4
    # Resumed, not restarted: the optimiser state continued from step 2.
    assert adam_steps(work / 'iter_4.pth') == {4}
