"""`mim train` / `mim test` (each library's own train/test script) run our configs once the package
is installed: custom_imports loads overlock_mm, its safe-load allow-list lets `mim test` read the
Runner checkpoint on torch >= 2.6. Tiny runs (2 iterations, a few images) of the demo configs."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools' / 'demo'))
from generate_data import generate  # noqa: E402

MIM = shutil.which('mim') or str(Path(sys.executable).with_name('mim'))
pytestmark = pytest.mark.skipif(not os.path.exists(MIM), reason='openmim is not installed')


def mim(*args, cwd):
    env = dict(os.environ, OMP_WAIT_POLICY='PASSIVE', PYTHONPATH='')
    proc = subprocess.run([MIM, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f'mim {" ".join(args)} failed:\n{out[-4000:]}'
    return out


def test_mim_train_and_test_mmpretrain(tmp_path):
    generate(tmp_path / 'data', tasks=('cls',), num_train=6, num_val=3, size=96)
    root = f'{tmp_path}/data/cls/'
    opts = ['--cfg-options', f'train_dataloader.dataset.data_root={root}',
            f'val_dataloader.dataset.data_root={root}', f'test_dataloader.dataset.data_root={root}',
            'train_dataloader.batch_size=2', 'train_cfg.max_iters=2', 'train_cfg.val_interval=2',
            'default_hooks.checkpoint.interval=2']
    config = str(ROOT / 'configs/demo/overlock-xt_demo.py')
    work = tmp_path / 'work'
    # run from an unrelated folder: the package is found because it is installed, not via cwd
    mim('train', 'mmpretrain', config, '--gpus', '0', '--work-dir', str(work), *opts,
        cwd=tmp_path)
    assert (work / 'iter_2.pth').exists()
    out = mim('test', 'mmpretrain', config, '--checkpoint', str(work / 'iter_2.pth'),
              '--gpus', '0', '--work-dir', str(work), *opts, cwd=tmp_path)
    assert 'accuracy/top1' in out


def test_mim_train_mmdet(tmp_path):
    generate(tmp_path / 'data', tasks=('coco',), num_train=4, num_val=2, size=128)
    root = f'{tmp_path}/data/coco/'
    config = str(ROOT / 'configs/demo/cascade-mask-rcnn_overlock-xt_demo.py')
    work = tmp_path / 'work'
    mim('train', 'mmdet', config, '--gpus', '0', '--work-dir', str(work), '--cfg-options',
        f'train_dataloader.dataset.data_root={root}', f'val_dataloader.dataset.data_root={root}',
        f'test_dataloader.dataset.data_root={root}',
        f'val_evaluator.ann_file={root}annotations/instances_val.json',
        f'test_evaluator.ann_file={root}annotations/instances_val.json',
        'train_dataloader.batch_size=1', 'train_cfg.max_iters=1', 'train_cfg.val_interval=1000',
        'default_hooks.checkpoint.interval=1', cwd=tmp_path)
    assert (work / 'iter_1.pth').exists()


def test_mim_train_without_data_names_the_paths(tmp_path):
    """mim runs mmdet's own tools/train.py, not ours: the config's DataCheckRunner checks."""
    config = str(ROOT / 'configs/demo/cascade-mask-rcnn_overlock-xt_demo.py')
    env = dict(os.environ, OMP_WAIT_POLICY='PASSIVE', PYTHONPATH='')
    proc = subprocess.run([MIM, 'train', 'mmdet', config, '--gpus', '0', '--work-dir',
                           str(tmp_path / 'work')], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "train_dataloader.dataset: data_root 'data/demo/coco/' does not exist" in out, \
        out[-3000:]
    assert '--cfg-options train_dataloader.dataset.data_root=/path/to/coco/' in out
    assert '(--cfg-options data_check=False skips this check' in out
