"""Helpers to build any config of this repository and push a small batch through it.

Only runtime settings are touched (pretrained downloads off, input size small, AMP off on CPU);
the model definition is the config's own.
"""
import ast
import importlib
from pathlib import Path

import numpy as np
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope

ROOT = Path(__file__).resolve().parents[1]
CONFIG_ROOT = ROOT / 'configs'


def all_configs():
    return sorted(p for p in CONFIG_ROOT.rglob('*.py') if '_base_' not in p.parts)


def alias_target(path: Path):
    """The config a pure alias file (only ``_base_ = './x.py'``) points to, else None."""
    tree = ast.parse(path.read_text())
    body = [n for n in tree.body if not isinstance(n, ast.Expr)]
    if len(body) == 1 and isinstance(body[0], ast.Assign) and \
            getattr(body[0].targets[0], 'id', None) == '_base_' and \
            isinstance(body[0].value, ast.Constant):
        return (path.parent / body[0].value.value).resolve()
    return None


def strip_pretrained(obj):
    """Remove ``Pretrained`` init_cfgs (no downloads in tests); returns how many were removed."""
    n = 0
    if isinstance(obj, dict):
        init = obj.get('init_cfg')
        if isinstance(init, dict) and init.get('type') == 'Pretrained':
            obj['init_cfg'] = None
            n += 1
        for v in obj.values():
            n += strip_pretrained(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            n += strip_pretrained(v)
    return n


def load_for_test(path) -> Config:
    cfg = Config.fromfile(str(path))
    strip_pretrained(cfg.model)
    cfg.load_from = None
    if cfg.optim_wrapper.get('type') == 'AmpOptimWrapper' and not torch.cuda.is_available():
        cfg.optim_wrapper.type = 'OptimWrapper'  # mmengine's AMP wrapper needs a GPU
        cfg.optim_wrapper.pop('loss_scale', None)
    return cfg


def build_model(cfg: Config):
    scope = cfg.default_scope
    init_default_scope(scope)
    registry = importlib.import_module(f'{scope}.registry')
    model_cfg = cfg.model.copy()
    if cfg.get('data_preprocessor') is not None:  # what mmengine's Runner does
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    model = registry.MODELS.build(model_cfg)
    model.init_weights()
    return model


def _det_batch(h, w, n=1, num_classes=80):
    # one image: the cascade RoI heads (3 x 4conv1fc on 512 sampled / 1000 test RoIs per image)
    # cost the same at any input size and dominate a CPU step
    from mmdet.testing import demo_mm_inputs
    return demo_mm_inputs(batch_size=n, image_shapes=(3, h, w), with_mask=True,
                          num_classes=num_classes)


def _seg_batch(h, w, n=2, num_classes=150):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    rng = np.random.RandomState(0)
    inputs, samples = [], []
    for _ in range(n):
        inputs.append(torch.from_numpy(rng.randint(0, 255, (3, h, w), dtype=np.uint8)))
        s = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        s.gt_sem_seg = PixelData(data=torch.from_numpy(rng.randint(0, num_classes, (1, h, w))))
        samples.append(s)
    return dict(inputs=inputs, data_samples=samples)


def _cls_batch(h, w, n=2, num_classes=1000):
    from mmpretrain.structures import DataSample
    rng = np.random.RandomState(0)
    return dict(
        inputs=[torch.from_numpy(rng.randint(0, 255, (3, h, w), dtype=np.uint8)) for _ in range(n)],
        data_samples=[DataSample().set_gt_label(i % num_classes) for i in range(n)])


#: default scope -> (batch builder, small input size)
BATCHES = {'mmdet': (_det_batch, (224, 256)), 'mmseg': (_seg_batch, (128, 160)),
           'mmpretrain': (_cls_batch, (96, 96))}


def num_classes(cfg: Config) -> int:
    """The class count of the config's heads (labels of the small batch must stay below it)."""
    model = cfg.model
    if cfg.default_scope == 'mmdet':
        head = model.roi_head.bbox_head
        return (head[0] if isinstance(head, list) else head).num_classes
    if cfg.default_scope == 'mmseg':
        return model.decode_head.num_classes
    return model.head.num_classes


def small_batch(cfg: Config):
    make, (h, w) = BATCHES[cfg.default_scope]
    if cfg.default_scope == 'mmseg':
        cfg.model.data_preprocessor.size = (h, w)
    return make(h, w, num_classes=num_classes(cfg))


def train_and_infer(cfg: Config):
    """One optimiser step and one inference step; returns (log_vars, predictions)."""
    data = small_batch(cfg)
    model = build_model(cfg)
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    model.train()
    log_vars = model.train_step(data, optim_wrapper)
    model.eval()
    with torch.no_grad():
        preds = model.test_step(data)
    return model, log_vars, preds
