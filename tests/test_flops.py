"""FLOP counting (tools/analysis/get_flops.py) against the reference counts of the authors'
re-parameterised classifier without aux head at 224x224 (independently counted; issue 2)."""
import pytest

from tool_utils import load_tool

get_flops = load_tool('tools/analysis/get_flops.py', 'get_flops')


@pytest.mark.parametrize('arch', ['xt', 't', 's', 'b'])
def test_classification_flops_and_params(arch):
    r = get_flops.classification(arch)
    ref = get_flops.REFERENCE_G[arch]
    assert round(r['params'] / 1e6, 2) == get_flops.REFERENCE_PARAMS_M[arch]
    assert abs(r['total'] / 1e9 / ref['total'] - 1) <= 0.01
    assert abs(r['convolutions'] / 1e9 / ref['convolutions'] - 1) <= 0.01
    # The small parts are given to 1-2 significant digits: compare at that precision.
    assert round(r['aggregation'] / 1e9, 2) == ref['aggregation']
    assert round(r['affinity'] / 1e9, 3) == ref['affinity']


@pytest.mark.parametrize('impl', ['native', 'cpu', 'triton'])
def test_every_aggregation_function_is_counted(impl, monkeypatch):
    """Each autograd function that computes na2d_av traces under its own PythonOp name; each
    gets the aggregation handle (B * G * D * H * W * k^2 MACs). 'triton' runs on CPU tensors in
    Triton's interpreter here (the trace is what matters, not the device)."""
    import torch
    from overlock_mm.utils.complexity import flop_breakdown
    if impl == 'triton':
        pytest.importorskip('triton')
        monkeypatch.setenv('TRITON_INTERPRET', '1')
        from test_ops_triton import _interpreter_runs_runtime_loops
        if not _interpreter_runs_runtime_loops():
            pytest.skip('this triton interpreter cannot loop over a runtime bound')
        from overlock_mm.ops.na2d_triton import na2d_av_triton as fn
    elif impl == 'cpu':
        from overlock_mm.ops.na2d_cpu import na2d_av_cpu as fn
    else:
        from overlock_mm.ops.neighborhood import _na2d_av_native as fn

    class Agg(torch.nn.Module):
        def forward(self, attn, value):
            return fn(attn, value, 3)

    attn = torch.rand(1, 2, 9, 5, 6, requires_grad=True)  # grad: keeps the autograd Function
    value = torch.rand(1, 2, 4, 5, 6, requires_grad=True)
    counts = flop_breakdown(Agg(), (attn, value))
    assert counts['aggregation'] == 1 * 2 * 4 * 5 * 6 * 9
