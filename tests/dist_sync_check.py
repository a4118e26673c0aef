"""Run tools/train.py under torchrun and dump every rank's weights after training.

Used by tests/test_distributed.py:
    torchrun --nproc_per_node 2 tests/dist_sync_check.py CONFIG --launcher pytorch ...
The hook below is added to the config tools/train.py builds (``--cfg-options`` cannot express a
hook dict); it saves ``rank{r}_{before,after}.pth`` (the unwrapped model's state dict) in the
work dir.
"""
import runpy
import sys
from pathlib import Path

import torch
from mmengine.dist import get_rank, get_world_size
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.runner import Runner


@HOOKS.register_module()
class DumpRankWeightsHook(Hook):

    def _dump(self, runner, tag):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        state['__world_size__'] = torch.tensor(get_world_size())
        state['__ddp__'] = torch.tensor(is_model_wrapper(runner.model))
        torch.save(state, Path(runner.work_dir) / f'rank{get_rank()}_{tag}.pth')

    def before_train(self, runner):
        self._dump(runner, 'before')

    def after_train(self, runner):
        self._dump(runner, 'after')


def _from_cfg_with_dump_hook(from_cfg):
    def wrapped(cfg):
        cfg.custom_hooks = list(cfg.get('custom_hooks') or []) + [dict(type='DumpRankWeightsHook')]
        return from_cfg(cfg)
    return wrapped


if __name__ == '__main__':
    Runner.from_cfg = _from_cfg_with_dump_hook(Runner.from_cfg)
    train_py = Path(__file__).resolve().parents[1] / 'tools' / 'train.py'
    sys.argv = [str(train_py)] + sys.argv[1:]
    runpy.run_path(str(train_py), run_name='__main__')
