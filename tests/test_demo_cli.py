"""tools/demo/run_demo.py --iters: every demo's shortened schedule is one mmengine accepts.

No training here: the shortened schedulers are built on a dummy optimizer, which is where
mmengine checks them (a scheduler must end after it begins)."""
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import PARAM_SCHEDULERS

from tool_utils import ROOT, load_tool

DEMO = load_tool('tools/demo/run_demo.py', 'olk_run_demo')


@pytest.mark.parametrize('task', sorted(DEMO.TASKS))
@pytest.mark.parametrize('iters', [5, 25, 60])
def test_short_runs_build_their_schedulers(task, iters):
    cfg = Config.fromfile(str(ROOT / DEMO.TASKS[task]['config']))
    DEMO._set_iters(cfg, iters)
    assert cfg.train_cfg.max_iters == iters and cfg.param_scheduler
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for sched in cfg.param_scheduler:
        assert sched.get('begin', 0) < sched['end'] <= iters, sched
        PARAM_SCHEDULERS.build(dict(sched, optimizer=opt))


def test_summary_names_metrics_the_evaluator_did_not_report():
    """A detector that predicted no box gets no COCO AP at all (mmdet's CocoMetric returns an
    empty dict): the summary must say so and why, not print an empty line."""
    wanted = DEMO.TASKS['det']['metrics']
    shown, missing = DEMO.metric_summary(wanted, {})
    assert shown == {} and missing == list(wanted)
    hint = DEMO.missing_metrics_hint('det', missing, 30)
    assert 'coco/bbox_mAP' in hint and '30 iterations' in hint and 'no box' in hint

    shown, missing = DEMO.metric_summary(wanted, {k: 0.123456 for k in wanted})
    assert shown == {k: 0.1235 for k in wanted} and missing == []
