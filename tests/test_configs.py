"""Every config under configs/ builds and runs one training and one inference step.

Only runtime settings change (no pretrained download, small input, AMP off on CPU): the models
are exactly the configs' models, so no config can rot unnoticed.
"""
import math

import pytest
import torch

from config_utils import ROOT, alias_target, all_configs, load_for_test, train_and_infer

CONFIGS = all_configs()
ALIASES = [p for p in CONFIGS if alias_target(p) is not None]
STEPPED = [p for p in CONFIGS if p not in ALIASES]


def rel(p):
    return str(p.relative_to(ROOT))


def test_configs_found():
    names = {p.name for p in CONFIGS}
    for required in ('cascade_overlock_t.py', 'cascade_overlock_s.py', 'cascade_overlock_b.py'):
        assert required in names


@pytest.mark.parametrize('path', ALIASES, ids=rel)
def test_alias_equals_its_target(path):
    """Aliases (e.g. cascade_overlock_s.py) are exactly their target, which is stepped below."""
    target = alias_target(path)
    assert target in STEPPED
    a, b = load_for_test(path).to_dict(), load_for_test(target).to_dict()
    assert a == b


@pytest.mark.parametrize('path', STEPPED, ids=rel)
def test_config_trains_and_infers(path):
    cfg = load_for_test(path)
    torch.manual_seed(0)
    model, log_vars, preds = train_and_infer(cfg)
    assert log_vars and all(math.isfinite(float(v)) for v in log_vars.values()), log_vars
    assert len(preds) == (1 if cfg.default_scope == 'mmdet' else 2)
    scope = cfg.default_scope
    if scope == 'mmdet':
        assert all('pred_instances' in p for p in preds)
        if 'mask' in cfg.model.type.lower():
            assert all('masks' in p.pred_instances for p in preds)
    elif scope == 'mmseg':
        assert all(p.pred_sem_seg.data.shape[-2:] == (128, 160) for p in preds)
    else:
        assert all(p.pred_score.shape == (cfg.model.head.num_classes,) for p in preds)
