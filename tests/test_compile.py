"""``torch.compile`` traces the backbone into one graph (``fullgraph=True``) and the compiled
training step equals the eager one: outputs, every gradient and every buffer (BatchNorm running
statistics move once, also through ``memory_efficient`` recomputation and ``with_cp``).

The ``aot_eager`` backend traces forward and backward exactly as Inductor would receive them
and runs the traced graphs with eager kernels, so the test costs seconds; Inductor itself
compiled the same tiny network in ~4.5 min on the 2-core CI machine (within 1.4e-5 / 1.3e-4 of
eager in outputs / gradients), too long for the suite.
"""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from autograd_utils import assert_grads_match
from overlock_mm import OverLoCK
from overlock_mm.ops import na2d_av, na2d_av_reference, na2d_cpu
from test_backbone_api import TINY


def training_step(model, x, backend=None):
    """One step of ``model`` (eager, or compiled with ``backend``): outputs, gradients and
    buffers after it."""
    run = torch.compile(model, backend=backend, fullgraph=True) if backend else model
    torch.manual_seed(1)  # the same drop-path masks on both sides
    torch.cuda.manual_seed_all(1)
    outs = run(x)
    # a loss that weighs every output element differently (a plain sum hides errors that cancel)
    sum((o * torch.linspace(0, 1, o.numel(), device=o.device).view_as(o)).sum()
        for o in outs).backward()
    return [o.detach() for o in outs], {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize('kwargs', [
    dict(),  # memory_efficient=True (the default): recomputed ranges
    dict(memory_efficient=False),
    dict(with_cp=True, drop_path_rate=0.5),  # whole blocks recomputed, random masks replayed
], ids=['default', 'no-recompute', 'with_cp-drop_path'])
def test_compiled_training_step_equals_eager(kwargs):
    if not na2d_cpu.is_available():
        pytest.skip("the 'cpu' na2d kernel is unavailable")
    assert_compiled_step_equals_eager(kwargs, 'cpu', 'aot_eager', out_tol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_compiled_training_step_equals_eager_on_cuda():
    """Inductor on CUDA (the Triton kernels as custom ops beside Inductor's own kernels); TF32
    off on both sides, so the comparison is float32 against float32."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        assert_compiled_step_equals_eager(dict(), 'cuda', 'inductor', out_tol=1e-3)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def assert_compiled_step_equals_eager(kwargs, device, backend, out_tol):
    torch.manual_seed(0)
    eager = OverLoCK(dict(TINY), layout='det', **kwargs).to(device).train()
    compiled = copy.deepcopy(eager)
    x = torch.randn(2, 3, 64, 64, device=device)
    outs_e, bufs_e = training_step(eager, x)
    outs_c, bufs_c = training_step(compiled, x, backend)
    for e, c in zip(outs_e, outs_c):
        torch.testing.assert_close(c, e, rtol=out_tol, atol=out_tol)
    # 0.1 % of each gradient's largest entry, with a floor of 1e-6 of the network's largest
    # gradient: the traced graph sums in another order, and the gradients that are zero up to
    # float32 noise (biases in front of a norm) differ there by ~1e-9 of the largest.
    assert_grads_match(compiled, eager, noise_floor=1e-6)
    for name, be in bufs_e.items():  # running statistics and batch counts moved once
        torch.testing.assert_close(bufs_c[name], be, rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_op_matches_reference_at_the_borders():
    """The ContMix aggregation alone, through the CPU kernel's custom ops, at a map whose every
    window is clamped on one axis (H == k)."""
    if not na2d_cpu.is_available():
        pytest.skip("the 'cpu' na2d kernel is unavailable")
    k, g = 7, torch.Generator().manual_seed(0)
    attn = torch.randn(1, 2, k * k, 7, 12, generator=g).softmax(2).requires_grad_()
    value = torch.randn(1, 2, 8, 7, 12, generator=g).requires_grad_()
    grad_out = torch.randn(1, 2, 8, 7, 12, generator=g)
    fn = torch.compile(lambda a, v: na2d_av(a, v, k, impl='cpu'), backend='aot_eager',
                       fullgraph=True)
    out = fn(attn, value)
    out.backward(grad_out)
    a, v = attn.detach().double().requires_grad_(), value.detach().double().requires_grad_()
    ref = na2d_av_reference(a, v, k)
    ref.backward(grad_out.double())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(attn.grad.double(), a.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(value.grad.double(), v.grad, rtol=0, atol=1e-5)


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


def test_eager_calls_skip_the_custom_op_dispatch():
    """Eager calls reach the kernel directly: the custom op's dispatch costs ~10 us a call on
    the CPU (ops/neighborhood.py, traceable_kernel); only traced code goes through it."""
    if not na2d_cpu.is_available():
        pytest.skip("the 'cpu' na2d kernel is unavailable")
    attn = torch.randn(1, 2, 25, 8, 9).softmax(2).requires_grad_()
    value = torch.randn(1, 2, 4, 8, 9).requires_grad_()
    with _OpNames() as seen:
        na2d_av(attn, value, 5, impl='cpu').sum().backward()
    assert not any(n.startswith('overlock_mm::') for n in seen.names), seen.names
    # ...while a trace records them (the op exists and is what the graph holds)
    trace = torch.fx.experimental.proxy_tensor.make_fx(
        lambda a, v: torch.ops.overlock_mm.na2d_cpu_forward(a, v, 5))
    gm = trace(attn.detach(), value.detach())
    assert 'na2d_cpu_forward' in gm.code
