"""overlock_mm.ops.grn: the hand-written backward against finite differences (float64) and
against autograd of the formula (float32), in both layouts the backbones use."""
import pytest
import torch

from overlock_mm.layers import GRN
from overlock_mm.ops.grn import grn, unfused_grn

LAYOUTS = [(1, (2, 3, 5, 4)), (-1, (2, 5, 4, 3))]  # (channel_dim, shape): NCHW, NHWC


def _params(shape, channel_dim, dtype, bias=True):
    pshape = [1] * 4
    pshape[channel_dim] = shape[channel_dim]
    gamma = torch.randn(pshape, dtype=dtype, requires_grad=True)
    beta = torch.randn(pshape, dtype=dtype, requires_grad=True) if bias else None
    return gamma, beta


@pytest.mark.parametrize('channel_dim,shape', LAYOUTS)
@pytest.mark.parametrize('bias', [True, False])
def test_gradcheck_float64(channel_dim, shape, bias):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    gamma, beta = _params(shape, channel_dim, torch.float64, bias)
    inputs = (x, gamma) + ((beta,) if bias else ())

    def f(x, gamma, beta=None):
        return grn(x, gamma, beta, channel_dim=channel_dim)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize('channel_dim,shape', LAYOUTS + [(1, (1, 64, 37, 53))])
def test_float32_matches_the_formula(channel_dim, shape):
    torch.manual_seed(1)
    x0 = torch.randn(shape)
    x0.select(channel_dim, 1).zero_()  # a dead channel: g = 0, where the norm's gradient is 0
    gamma, beta = _params(shape, channel_dim, torch.float32)
    grad = torch.randn(shape)
    results = []
    for ctx in (unfused_grn, torch.enable_grad):
        x = x0.clone().requires_grad_()
        gamma.grad = beta.grad = None
        with ctx():
            out = grn(x, gamma, beta, channel_dim=channel_dim)
        out.backward(grad)
        with torch.no_grad(), ctx():
            out_infer = grn(x0, gamma, beta, channel_dim=channel_dim)
        results.append((out, out_infer, x.grad, gamma.grad.clone(), beta.grad.clone()))
    for ref, ours in zip(*results):
        scale = ref.abs().max().clamp_min(1.0)
        assert (ours - ref).abs().max() <= 1e-5 * scale
    assert torch.isfinite(results[1][2]).all()


def test_only_gamma_requires_grad():
    x = torch.randn(2, 4, 6, 5)
    gamma, beta = _params(x.shape, 1, torch.float32)
    beta.requires_grad_(False)
    grn(x, gamma, beta).sum().backward()
    with unfused_grn():
        ref = torch.autograd.grad(grn(x, gamma, beta).sum(), gamma)[0]
    torch.testing.assert_close(gamma.grad, ref)


def test_module_uses_it_and_rejects_wrong_rank():
    m = GRN(8)
    torch.nn.init.normal_(m.gamma)
    torch.nn.init.normal_(m.beta)
    x = torch.randn(2, 8, 7, 9)
    with unfused_grn():
        ref = m(x)
    torch.testing.assert_close(m(x), ref)
    with pytest.raises(ValueError, match='4-D'):
        m(torch.randn(8, 7, 9))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_input_under_autocast(dtype):
    """A half-precision map (autocast) with float32 parameters: the same dtypes as the formula's
    (float32 output, the input's dtype for its gradient) and the same values to that precision."""
    torch.manual_seed(2)
    x0 = torch.randn(2, 8, 5, 7).to(dtype)
    gamma, beta = _params(x0.shape, 1, torch.float32)
    results = []
    for ctx in (unfused_grn, torch.enable_grad):
        x = x0.clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16), ctx():
            out = grn(x, gamma, beta)
        out.float().sum().backward()
        results.append((out, x.grad))
    (ref, ref_grad), (out, grad) = results
    assert out.dtype == ref.dtype and grad.dtype == ref_grad.dtype == dtype
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.float(), ref_grad.float(), atol=2e-2, rtol=2e-2)
