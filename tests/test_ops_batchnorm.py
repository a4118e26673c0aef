"""BatchNorm's CPU training path (ops/batchnorm.py, csrc/batchnorm_cpu.cpp) and the
``BatchNorm2d`` layer that uses it (layers/norm.py): the same numbers as PyTorch's BatchNorm."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from overlock_mm.layers import BatchNorm2d
from overlock_mm.ops import na2d_cpu
from overlock_mm.ops.batchnorm import batch_norm_train, fast_path_applies

needs_kernel = pytest.mark.skipif(not na2d_cpu.is_available(),
                                  reason='the C++ kernel library is not built')


@needs_kernel
@pytest.mark.parametrize('shape,affine,offset', [
    ((1, 5, 7, 9), True, 0.),         # planes shorter than a vector
    ((3, 4, 33, 17), True, 40.),      # a large mean beside a unit variance; vector tails
    ((2, 3, 64, 130), False, -3.),    # no weight or bias; planes over one 4096-element block
    ((1, 2, 1, 2), True, 1.),         # two values per channel
])
def test_matches_float64(shape, affine, offset):
    """Output, batch statistics and every gradient against float64 ``F.batch_norm``."""
    g = torch.Generator().manual_seed(sum(shape))
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset).requires_grad_()
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64).requires_grad_() if affine else None
    ref = F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
    gy = torch.randn(shape, generator=g, dtype=torch.float64)
    params = [t for t in (x, w, b) if t is not None]
    want = torch.autograd.grad(ref, params, gy)

    xf = x.detach().float().requires_grad_()
    wf = w.detach().float().requires_grad_() if affine else None
    bf = b.detach().float().requires_grad_() if affine else None
    assert fast_path_applies(xf)
    out, mean, var = batch_norm_train(xf, wf, bf, 1e-5)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean.double(), x.detach().mean((0, 2, 3)), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(var.double(), x.detach().var((0, 2, 3), unbiased=False),
                               atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad(out, [t for t in (xf, wf, bf) if t is not None], gy.float())
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, atol=1e-5, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize('momentum', [0.1, None])
def test_layer_trains_like_nn_batchnorm(monkeypatch, momentum):
    """Three training steps and an eval step: outputs, gradients, running statistics and the
    batch count equal ``nn.BatchNorm2d``'s, and our kernel ran in the training forwards."""
    calls = []
    real = na2d_cpu.bn_forward
    monkeypatch.setattr(na2d_cpu, 'bn_forward', lambda *a: calls.append(1) or real(*a))
    ours, ref = BatchNorm2d(6, momentum=momentum), nn.BatchNorm2d(6, momentum=momentum)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        x = torch.randn(2, 6, 11, 13, generator=g) * (step + 1) + step
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yr = ours(xo), ref(xr)
        torch.testing.assert_close(yo, yr, atol=1e-5, rtol=1e-5)
        gy = torch.randn(yo.shape, generator=g)
        (yo * gy).sum().backward()
        (yr * gy).sum().backward()
        torch.testing.assert_close(xo.grad, xr.grad, atol=1e-5, rtol=1e-4)
    assert len(calls) == 3
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, atol=1e-4, rtol=1e-4)
    for name in ('running_mean', 'running_var'):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), atol=1e-6, rtol=1e-5)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    ours.eval()
    ref.eval()
    x = torch.randn(2, 6, 11, 13, generator=g)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    assert len(calls) == 3  # eval mode is nn.BatchNorm2d's


@pytest.mark.parametrize('case', ['eval', 'channels_last', 'float64', 'one value', 'no kernel'])
def test_other_inputs_take_pytorch(monkeypatch, case):
    """Where the fast path does not apply, the layer is ``nn.BatchNorm2d`` (same results)."""
    calls = []
    real = na2d_cpu.bn_forward
    monkeypatch.setattr(na2d_cpu, 'bn_forward', lambda *a: calls.append(1) or real(*a))
    if case == 'no kernel':
        monkeypatch.setattr(na2d_cpu, 'is_available', lambda: False)
    ours, ref = BatchNorm2d(3), nn.BatchNorm2d(3)
    x = torch.randn(2, 3, 5, 4)
    if case == 'eval':
        ours.eval()
        ref.eval()
    elif case == 'channels_last':
        x = x.contiguous(memory_format=torch.channels_last)
    elif case == 'float64':
        x, ours, ref = x.double(), ours.double(), ref.double()
    elif case == 'one value':
        x = x[:1, :, :1, :1]
        with pytest.raises(ValueError, match='more than 1 value per channel'):
            ours(x)
        assert not calls
        return
    torch.testing.assert_close(ours(x), ref(x))
    assert not calls
