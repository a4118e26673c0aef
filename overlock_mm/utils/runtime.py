"""Runtime adjustments shared by tools/train.py, tools/test.py and the demo.

Only *how* a config runs changes here (devices, process groups), never the model.
"""
from typing import Any

import torch
from mmengine.config import Config
from mmengine.logging import print_log


def _replace_syncbn(obj: Any) -> int:
    n = 0
    if isinstance(obj, dict):
        if obj.get('type') in ('SyncBN', 'MMSyncBN', 'TorchSyncBN'):
            obj['type'] = 'BN'
            n += 1
        for v in obj.values():
            n += _replace_syncbn(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            n += _replace_syncbn(v)
    return n


def adapt_to_cpu(cfg: Config, launcher: str) -> Config:
    """Make a GPU recipe runnable on CPU (single or multi-process).

    * ``AmpOptimWrapper`` needs a GPU in mmengine: fall back to fp32 ``OptimWrapper``.
    * Multi-process CPU training (``launcher='pytorch'``): mmengine's launcher calls
      ``torch.cuda.set_device``, so a gloo process group is initialised here first (mmengine then
      keeps it), DDP is built without ``device_ids``, and SyncBatchNorm -- which needs a GPU --
      becomes per-process BatchNorm.
    """
    if torch.cuda.is_available():
        return cfg
    if cfg.get('optim_wrapper', {}).get('type') == 'AmpOptimWrapper':
        print_log('No GPU: AmpOptimWrapper -> OptimWrapper (fp32).', logger='current')
        cfg.optim_wrapper.type = 'OptimWrapper'
        cfg.optim_wrapper.pop('loss_scale', None)
    if launcher == 'none':
        return cfg
    if launcher != 'pytorch':
        raise ValueError(f"CPU multi-process runs support launcher='pytorch' (torchrun) only, "
                         f"got '{launcher}'.")
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo')
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
    cfg.model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None)
    cfg.sync_bn = None
    if _replace_syncbn(cfg.model):
        print_log('No GPU: SyncBN -> BN (SyncBatchNorm needs CUDA).', logger='current')
    return cfg
