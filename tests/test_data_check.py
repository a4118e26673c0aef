"""Missing dataset paths fail at once with the config keys to change (utils/data_check.py), and
tools/train.py / tools/test.py run that check before building anything."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mmengine.config import Config

from overlock_mm.utils.data_check import check_data_paths, missing_data_paths

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools' / 'demo'))
from generate_data import generate  # noqa: E402

DET = str(ROOT / 'configs/mmdet'
          / 'cascade-mask-rcnn_overlock-t_fpn_4conv1fc-giou_8xb2-ms-crop-3x_coco.py')
DEMO_DET = str(ROOT / 'configs/demo/cascade-mask-rcnn_overlock-xt_demo.py')
SEG = str(ROOT / 'configs/mmseg/upernet_overlock-t_8xb2-160k_ade20k-512x512.py')
CLS = str(ROOT / 'configs/mmpretrain/overlock-t_8xb256_in1k.py')


def keys(missing):
    return [(opt, os.path.normpath(path)) for _, _, opt, path in missing]


def test_missing_coco_names_every_path_and_the_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/ here
    cfg = Config.fromfile(DET)
    with pytest.raises(FileNotFoundError) as err:
        check_data_paths(cfg, 'train')
    msg = str(err.value)
    assert "train_dataloader.dataset: data_root 'data/coco/' does not exist" in msg
    assert "val_evaluator: ann_file 'data/coco/annotations/instances_val2017.json'" in msg
    assert str(tmp_path) in msg  # where relative paths were looked up
    assert ('--cfg-options train_dataloader.dataset.data_root=/path/to/coco/ '
            'val_dataloader.dataset.data_root=/path/to/coco/ val_evaluator.ann_file=') in msg
    # under a missing data_root the files inside it are not listed again
    assert 'ann_file' not in [what for owner, what, _, _ in missing_data_paths(cfg, 'train')
                              if owner.endswith('dataset')]
    # a test run reads the test loader and evaluator only
    assert [k for k, _ in keys(missing_data_paths(cfg, 'test'))] == [
        'test_dataloader.dataset.data_root', 'test_evaluator.ann_file']


def test_generated_coco_passes_and_a_missing_file_inside_it_is_named(tmp_path, monkeypatch):
    generate(tmp_path / 'data', tasks=('coco',), num_train=2, num_val=1, size=64)
    root = tmp_path / 'data' / 'coco'
    cfg = Config.fromfile(DEMO_DET)
    opts = {f'{loader}.dataset.data_root': f'{root}/'
            for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')}
    opts['val_evaluator.ann_file'] = f'{root}/annotations/instances_val.json'
    opts['test_evaluator.ann_file'] = f'{root}/annotations/instances_val.json'
    cfg.merge_from_dict(opts)
    check_data_paths(cfg, 'train')
    check_data_paths(cfg, 'test')

    (root / 'annotations' / 'instances_train.json').unlink()
    (root / 'val').rename(root / 'valid')
    assert keys(missing_data_paths(cfg, 'train')) == [
        ('train_dataloader.dataset.ann_file', str(root / 'annotations/instances_train.json')),
        ('val_dataloader.dataset.data_prefix.img', str(root / 'val'))]


def test_wrappers_splits_uris_and_no_validation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'imagenet').mkdir()
    inner = dict(type='CocoDataset', data_root='missing/', ann_file='a.json')
    cfg = Config(dict(
        train_dataloader=dict(dataset=dict(type='RepeatDataset', times=2, dataset=dict(
            type='ConcatDataset', datasets=[inner, dict(type='ImageNet', data_root='imagenet',
                                                        split='train')]))),
        val_dataloader=dict(dataset=dict(type='CocoDataset', data_root='s3://bucket/coco/',
                                         ann_file='a.json')),
        val_cfg=dict(type='ValLoop')))
    assert keys(missing_data_paths(cfg, 'train')) == [
        ('train_dataloader.dataset.dataset.datasets.0.data_root', 'missing'),
        # mmpretrain's ImageNet reads data_root/<split> when data_prefix is empty
        ('train_dataloader.dataset.dataset.datasets.1.data_prefix', 'imagenet/train')]
    (tmp_path / 'imagenet' / 'train').mkdir()
    cfg.val_dataloader.dataset.data_root = 'elsewhere/'
    assert len(missing_data_paths(cfg, 'train')) == 2  # validation is read: it is checked
    cfg.val_cfg = None  # ...unless there is no validation loop
    assert len(missing_data_paths(cfg, 'train')) == 1


@pytest.mark.parametrize('config', [SEG, CLS])
def test_ade20k_and_imagenet_configs(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = missing_data_paths(Config.fromfile(config), 'train')
    assert [k for k, _ in keys(missing)] == ['train_dataloader.dataset.data_root',
                                             'val_dataloader.dataset.data_root']


def run_tool(tool, *args, cwd):
    env = dict(os.environ, OMP_WAIT_POLICY='PASSIVE')
    return subprocess.run([sys.executable, str(ROOT / 'tools' / tool), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_train_and_test_tools_check_before_building(tmp_path):
    proc = run_tool('train.py', DEMO_DET, '--work-dir', str(tmp_path / 'w'), cwd=tmp_path)
    assert proc.returncode != 0
    assert "data_root 'data/demo/coco/' does not exist" in proc.stderr
    assert 'Fix: put the dataset there' in proc.stderr
    assert not (tmp_path / 'w').exists()  # failed before the Runner made its work dir

    ckpt = tmp_path / 'model.pth'
    ckpt.write_bytes(b'')
    proc = run_tool('test.py', DEMO_DET, str(ckpt), cwd=tmp_path)
    assert proc.returncode != 0
    assert "test_dataloader.dataset: data_root 'data/demo/coco/'" in proc.stderr
    assert 'val_dataloader' not in proc.stderr


@pytest.mark.parametrize('command', ['train', 'val', 'test'])
def test_config_runner_checks_before_its_loops(command, tmp_path, monkeypatch):
    """Our configs' runner_type: entry points that never run tools/train.py (mim train, the
    libraries' scripts) build DataCheckRunner, which checks before building a loop."""
    from mmengine.registry import RUNNERS
    monkeypatch.chdir(tmp_path)  # no data/ here
    cfg = Config.fromfile(DEMO_DET)
    assert cfg.runner_type == 'DataCheckRunner'
    cfg.work_dir = str(tmp_path / 'w')
    runner = RUNNERS.build(cfg)
    with pytest.raises(FileNotFoundError) as err:
        getattr(runner, command)()
    msg = str(err.value)
    loader = 'train' if command == 'train' else command
    assert f"{loader}_dataloader.dataset: data_root 'data/demo/coco/' does not exist" in msg
    assert '(--cfg-options data_check=False skips this check' in msg
    # switched off, the run goes on to the dataset, which fails its own way: by the config, or
    # by our tools, which have checked already and mark the runner instead of the config (a
    # config dumped into the work dir must keep checking when it is reused)
    runner = RUNNERS.build(cfg)
    runner.paths_checked = True
    with pytest.raises(FileNotFoundError) as err:
        getattr(runner, command)()
    assert 'Fix: put the dataset there' not in str(err.value)
    cfg.data_check = False
    with pytest.raises(FileNotFoundError) as err:
        getattr(RUNNERS.build(cfg), command)()
    assert 'Fix: put the dataset there' not in str(err.value)
