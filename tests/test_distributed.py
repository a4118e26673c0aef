"""Two processes (torchrun, gloo) train a detector and a segmentor through tools/train.py with
launcher='pytorch'; every rank must end with identical weights that differ from the start. The
segmentor's backbone checkpoints two stages (with drop path): gradients of recomputed blocks must
reach DDP's reducer like any other."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools' / 'demo'))
from generate_data import generate  # noqa: E402

CASES = {
    'det': ('configs/demo/cascade-mask-rcnn_overlock-xt_demo.py', 'coco'),
    'seg': ('configs/demo/upernet_overlock-xt_demo.py', 'ade'),
}


@pytest.mark.parametrize('task', list(CASES))
def test_two_process_training_stays_in_sync(task, tmp_path):
    config, data = CASES[task]
    generate(tmp_path / 'data', tasks=(data,), num_train=8, num_val=2, size=128)
    root = f'{tmp_path}/data/{data}/'
    work = tmp_path / 'work'
    opts = [
        f'train_dataloader.dataset.data_root={root}',
        f'val_dataloader.dataset.data_root={root}',  # the runner builds the val loop at start
        # UperNet's pooling module needs 2 images per BN (1x1 maps)
        f'train_dataloader.batch_size={2 if task == "seg" else 1}',
        'train_cfg.max_iters=3', 'train_cfg.val_interval=1000',
        'param_scheduler.0.end=3',
        'default_hooks.checkpoint.interval=1000',
    ]
    if task == 'det':
        opts.append(f'val_evaluator.ann_file={root}annotations/instances_val.json')
    if task == 'seg':
        opts += ['model.data_preprocessor.size=(128,128)',
                 'train_dataloader.dataset.pipeline.3.crop_size=(128,128)',
                 # checkpointed drop-path blocks (stride 8; stride 32 with the Focus-Net's
                 # tuple-returning blocks) under DDP, selective recomputation elsewhere
                 'model.backbone.with_cp=(False,True,False,True)',
                 'model.backbone.drop_path_rate=0.2']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=f'{ROOT}:{ROOT / "tests"}')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
           '--master_port', str(29600 + list(CASES).index(task)),
           str(ROOT / 'tests' / 'dist_sync_check.py'), config, '--launcher', 'pytorch',
           '--work-dir', str(work), '--cfg-options', *opts]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [torch.load(work / f'rank{r}_after.pth', weights_only=True) for r in (0, 1)]
    start = torch.load(work / 'rank0_before.pth', weights_only=True)
    for r in ranks:  # really two ranks under DDP (each rank samples a different data shard)
        assert r.pop('__world_size__').item() == 2 and r.pop('__ddp__').item()
    start.pop('__world_size__'), start.pop('__ddp__')
    assert ranks[0].keys() == ranks[1].keys()
    changed = 0
    for k, v in ranks[0].items():
        if k.endswith(('running_mean', 'running_var', 'num_batches_tracked')):
            # plain BN on CPU (SyncBN needs a GPU): DDP broadcasts rank 0's buffers at the start
            # of each forward, so the last forward's per-rank statistics legitimately differ
            continue
        assert torch.equal(v, ranks[1][k]), f'rank weights diverged at {k}'
        if v.is_floating_point() and not torch.equal(v, start[k]):
            changed += 1
    assert changed > 0.5 * sum(v.is_floating_point() for v in start.values())
