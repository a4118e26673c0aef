"""Safe loading: weights_only=True everywhere, mmengine checkpoints still resume, code refused."""
import ast
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import released_checkpoints as rc
from overlock_mm.utils.checkpoint import CheckpointError, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]


class TouchPayload:
    """Unpickling it with plain pickle creates a file: a stand-in for arbitrary code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


class EvalPayload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (eval, (f'open({str(self.path)!r}, "w").close()',))


@pytest.mark.parametrize('payload', [TouchPayload, EvalPayload])
def test_pickled_code_is_refused(tmp_path, payload):
    marker = tmp_path / 'executed'
    src = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.zeros(2)}, 'meta': payload(marker)}, src)
    # the file really carries code
    assert rc.pickle_globals(src) & {'__builtin__.eval', 'builtins.eval', 'pathlib.Path'}
    with pytest.raises(CheckpointError, match=r'refusing to load .*evil\.pth.*could execute code'):
        read_checkpoint(str(src))
    assert not marker.exists()
    # mmengine's own loader (load_from / resume) goes through torch's weights_only default
    from mmengine.runner.checkpoint import _load_checkpoint
    with pytest.raises(pickle.UnpicklingError):
        _load_checkpoint(str(src), map_location='cpu')
    assert not marker.exists()


def test_refusal_names_the_offending_global(tmp_path):
    src = tmp_path / 'evil.pth'
    torch.save({'x': EvalPayload(tmp_path / 'm')}, src)
    with pytest.raises(CheckpointError, match=r'objects \(eval\).*GLOBAL eval was not an allowed'):
        read_checkpoint(str(src))


class GetattrPayload:
    """``getattr(HistoryBuffer, name)``: how pickle stores HistoryBuffer's statistics methods."""

    def __init__(self, name):
        self.name = name

    def __reduce__(self):
        from mmengine.logging import HistoryBuffer
        return (getattr, (HistoryBuffer, self.name))


def test_restricted_getattr(tmp_path):
    from mmengine.logging import HistoryBuffer
    ok = tmp_path / 'ok.pth'
    torch.save({'f': GetattrPayload('mean')}, ok)
    assert torch.load(ok, weights_only=True)['f'] == HistoryBuffer.mean
    for name in ('__init__', '__class__', '__subclasses__'):
        bad = tmp_path / f'{name}.pth'
        torch.save({'f': GetattrPayload(name)}, bad)
        with pytest.raises(pickle.UnpicklingError, match='only HistoryBuffer statistics'):
            torch.load(bad, weights_only=True)
        with pytest.raises(CheckpointError, match='refusing to load'):
            read_checkpoint(str(bad))


def test_mmcv1_checkpoints_load_weights_only(tmp_path):
    """mmdet 2.x / mmseg 0.x checkpoints (meta with tuples, strings, numpy scalars written under
    numpy 1.x, OrderedDict state dict with _metadata, AdamW state) are plain data."""
    sd = rc.random_state_dict({'backbone.patch_embed1.1.weight': (28,),
                               'backbone.patch_embed1.1.num_batches_tracked': ()})
    ckpt = {'meta': rc.mmcv1_meta('seg', 't'), 'state_dict': sd, 'optimizer': rc.adamw_state()}
    path = rc.save_as_numpy1(ckpt, tmp_path / 'seg.pth')
    assert 'numpy.core.multiarray.scalar' in rc.pickle_globals(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt['meta']['hook_msgs']['best_score'] == np.float64(0.503)
    assert isinstance(ckpt['meta']['CLASSES'], tuple)
    assert ckpt['optimizer']['param_groups'][0]['betas'] == (0.9, 0.999)
    assert hasattr(ckpt['state_dict'], '_metadata')


# ------------------------------------------------------------------------- mmengine resume
def _toy_runner(work_dir, max_iters, **kw):
    from mmengine.model import BaseModel
    from mmengine.runner import Runner
    from torch.utils.data import Dataset

    class Toy(BaseModel):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 1)
            self.bn = nn.BatchNorm1d(1)

        def forward(self, inputs, data_samples=None, mode='tensor'):
            out = self.bn(self.linear(inputs))
            if mode == 'loss':
                return {'loss': (out.squeeze(1) - data_samples).pow(2).mean()}
            return out

    class Data(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return dict(inputs=torch.tensor([float(i), 1.]), data_samples=torch.tensor(1.))

    return Runner(
        model=Toy(), work_dir=str(work_dir),
        train_dataloader=dict(dataset=Data(), sampler=dict(type='DefaultSampler', shuffle=False),
                              batch_size=2, num_workers=0, collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01)),
        param_scheduler=dict(type='MultiStepLR', milestones=[1], by_epoch=False),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=[dict(type='EMAHook')], default_scope=None, **kw)


def test_mmengine_checkpoint_resumes_with_weights_only(tmp_path):
    runner = _toy_runner(tmp_path / 'a', 2)
    runner.train()
    ckpt = tmp_path / 'a' / 'iter_2.pth'
    # mmengine writes non-tensor types (HistoryBuffer, numpy, getattr) that need the allow-list
    assert any('HistoryBuffer' in g for g in rc.pickle_globals(ckpt))
    loaded = read_checkpoint(str(ckpt))
    assert {'meta', 'state_dict', 'optimizer', 'message_hub', 'ema_state_dict'} <= set(loaded)
    resumed = _toy_runner(tmp_path / 'b', 4, resume=True, load_from=str(ckpt))
    resumed.train()  # mmengine's resume path: torch.load with weights_only=True by default
    assert resumed.iter == 4


# ----------------------------------------------------------------------- no unsafe torch.load
def _calls(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = ast.unparse(f)
            yield name, {kw.arg: kw.value for kw in node.keywords}, node.lineno


def test_every_load_is_weights_only():
    files = sorted((ROOT / 'overlock_mm').rglob('*.py')) + sorted((ROOT / 'tools').rglob('*.py'))
    assert files
    bad = []
    for path in files:
        for name, kws, line in _calls(path):
            if name.endswith(('torch.load', 'load_state_dict_from_url')) or name == 'load':
                if name == 'load' and 'weights_only' not in kws:
                    continue  # json/yaml load etc.
                wo = kws.get('weights_only')
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    bad.append(f'{path.relative_to(ROOT)}:{line}: {name}(...) without '
                               'weights_only=True')
            for kw, value in kws.items():
                if kw == 'weights_only' and isinstance(value, ast.Constant) and \
                        value.value is False:
                    bad.append(f'{path.relative_to(ROOT)}:{line}: weights_only=False')
    assert not bad, '\n'.join(bad)
