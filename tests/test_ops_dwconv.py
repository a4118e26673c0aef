"""overlock_mm.ops.depthwise_conv2d (faster CPU paths: large kernels, plain 3x3) equals F.conv2d:
outputs and all three gradients, at the kernel sizes / dilations / paddings the backbones use."""
import copy

import pytest
import torch
import torch.nn.functional as F

from overlock_mm.layers.conv import DWConv2d
from overlock_mm.ops import dwconv, na2d_cpu
from overlock_mm.ops.dwconv import contiguous_for_dwconv, depthwise_conv2d, torch_depthwise

CASES = [  # (N, C, H, W, k, dilation, padding)
    (1, 8, 12, 14, 5, 1, 2),
    (1, 4, 12, 20, 3, 4, 4),       # dilated 3x3 (our 3x3 kernel, see below)
    (2, 6, 9, 11, 5, 2, 4),        # dilated branch, 'same'
    (2, 5, 20, 17, 7, 3, 9),
    (3, 4, 16, 16, 13, 1, 6),
    (2, 4, 18, 19, 15, 1, 7),      # channels-last forward from here on
    (1, 3, 10, 12, 17, 1, 8),      # kernel larger than the map
    (2, 4, 11, 13, 17, 1, 3),      # not 'same' padding
    (2, 4, 21, 22, 9, 2, 8),       # dilated large kernel: run as a dense 17x17
    (1, 3, 12, 12, 9, 2, 12),      # padding beyond the kernel's extent
    (2, 5, 9, 11, 3, 1, 1),        # plain 3x3: our kernel (csrc/dwconv3x3_cpu.cpp) from here on
    (1, 4, 17, 40, 3, 1, 1),       # rows longer than its 16-lane loops, a remainder
    (1, 3, 1, 7, 3, 1, 1),         # one row
    (2, 3, 6, 1, 3, 1, 1),         # one column
    (1, 2, 2, 2, 3, 1, 1),
    (1, 3, 18, 37, 3, 2, 2),       # dilated 3x3, "same" padding: our kernel too
    (2, 3, 9, 7, 3, 3, 3),         # fewer than 2d + 1 columns: no interior column
    (1, 2, 5, 6, 3, 5, 5),         # dilation >= the map: only the centre tap
    (1, 4, 12, 20, 3, 2, 1),       # dilated 3x3, other padding: F.conv2d inside our path
]


@pytest.mark.parametrize('n,c,h,w,k,d,p', CASES)
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('residual', [False, True])
@pytest.mark.parametrize('small_maps', ['oneDNN', 'own'])
def test_matches_conv2d(monkeypatch, n, c, h, w, k, d, p, bias, residual, small_maps):
    if residual and p != d * (k // 2):
        pytest.skip('x + conv(x) needs the output to have the input\'s size')
    if small_maps == 'own':  # these maps are small: take csrc/dwconv_kxk_cpu.cpp's forward too
        if k == 3 or not na2d_cpu.is_available():
            pytest.skip('3x3 kernels have their own kernel; or the library is not built')
        monkeypatch.setattr(dwconv, 'OWN_FORWARD_MIN_PIXELS', 0)
    g = torch.Generator().manual_seed(n * 100 + k)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    wt = torch.randn(c, 1, k, k, generator=g, dtype=torch.float64)
    b = torch.randn(c, generator=g, dtype=torch.float64) if bias else None
    ref_in = [t.clone().requires_grad_() for t in (x, wt) + ((b,) if bias else ())]
    ref = F.conv2d(ref_in[0], ref_in[1], ref_in[2] if bias else None, 1, p, d, c)
    if residual:  # ResDWConv
        ref = ref_in[0] + ref
    gy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, ref_in, gy)

    ours_in = [t.float().clone().requires_grad_() for t in (x, wt) + ((b,) if bias else ())]
    out = depthwise_conv2d(ours_in[0], ours_in[1], ours_in[2] if bias else None, 1, p, d,
                           residual=residual)
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    grads = torch.autograd.grad(out, ours_in, gy.float())
    for name, got, want in zip(('input', 'weight', 'bias'), grads, ref_grads):
        torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4, msg=name)


@pytest.mark.skipif(not na2d_cpu.is_available(), reason='the C++ kernel library is not built')
@pytest.mark.parametrize('n,c,h,w,kernel,padding,dilation', [
    (2, 3, 11, 13, (5, 5), (2, 2), (1, 1)),
    (1, 4, 9, 21, (3, 7), (1, 3), (1, 1)),      # non-square, other padding per axis
    (2, 2, 17, 19, (7, 7), (6, 6), (2, 2)),
    (1, 3, 8, 8, (17, 17), (8, 8), (1, 1)),     # kernel larger than the map; three column blocks
    (3, 2, 13, 35, (9, 9), (8, 8), (2, 2)),
    (1, 2, 10, 12, (3, 3), (0, 1), (1, 1)),     # not "same"
    (1, 2, 16, 40, (5, 3), (1, 0), (3, 2)),     # dilation differs per axis
    (2, 5, 6, 50, (13, 13), (6, 6), (1, 1)),    # more channels than threads, rows > one vector
    (1, 3, 5, 150, (5, 5), (2, 2), (1, 1)),     # rows of two full forward tiles and a rest
])
def test_kxk_kernels(n, c, h, w, kernel, padding, dilation):
    """csrc/dwconv_kxk_cpu.cpp's forward and weight gradient against float64 F.conv2d."""
    g = torch.Generator().manual_seed(h * w)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(c, 1, *kernel, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(c, generator=g, dtype=torch.float64)
    out = F.conv2d(x, weight, bias, 1, padding, dilation, c)
    got = na2d_cpu.dw_forward(x.float(), weight.detach().float(), bias.float(), padding, dilation)
    assert got.shape == out.shape and got.is_contiguous()
    torch.testing.assert_close(got.double(), out, atol=1e-4, rtol=1e-4)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    want, = torch.autograd.grad(out, weight, grad_out)
    got = na2d_cpu.dw_grad_weight(x.float(), grad_out.float(), kernel, padding, dilation)
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize('n,c,h,w,k,d,p', [CASES[0], CASES[3], CASES[6], CASES[9], CASES[10]])
def test_without_the_kernel_library(monkeypatch, n, c, h, w, k, d, p):
    """Where the C++ library is not built, the weight gradient is oneDNN convolutions (and 3x3
    kernels plain ``F.conv2d``): the same results."""
    monkeypatch.setattr(na2d_cpu, 'is_available', lambda: False)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c, 1, k, k, generator=g, dtype=torch.float64, requires_grad=True)
    ref = F.conv2d(x, weight, None, 1, p, d, c)
    gy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(ref, (x, weight), gy)
    xf, wf = (t.detach().float().requires_grad_() for t in (x, weight))
    out = depthwise_conv2d(xf, wf, None, 1, p, d)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    for got, exp in zip(torch.autograd.grad(out, (xf, wf), gy.float()), want):
        torch.testing.assert_close(got.double(), exp, atol=2e-4, rtol=1e-4)


@pytest.mark.skipif(not na2d_cpu.is_available(), reason='the C++ kernel library is not built')
@pytest.mark.parametrize('size,k,d,channels_last,own', [
    (128, 5, 1, False, True),      # a large NCHW map: our forward
    (128, 5, 1, True, False),      # channels-last: oneDNN in place
    (128, 17, 1, True, False),     # channels-last, large: oneDNN (one copy back)
    (128, 9, 2, True, True),       # channels-last, dilated large: ours (oneDNN: a dense 17x17)
    (64, 17, 1, False, False),     # a small map: oneDNN
])
def test_forward_dispatch(monkeypatch, size, k, d, channels_last, own):
    """Which forward runs (point 6 of ops/dwconv.py), and its result against float64."""
    calls = []
    real = na2d_cpu.dw_forward
    monkeypatch.setattr(na2d_cpu, 'dw_forward', lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(size + k)
    x = torch.randn(1, 2, size, size + 3, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(2, 1, k, k, generator=g)
    p = d * (k // 2)
    with torch.no_grad():
        out = depthwise_conv2d(x, w, None, 1, p, d)
    assert bool(calls) == own
    want = F.conv2d(x.double(), w.double(), None, 1, p, d, 2)
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)


def test_dispatch():
    # float32 CPU training takes the custom path (checked against float64 F.conv2d above);
    # inference stays a plain aten convolution (no autograd node), float64 is plain F.conv2d
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    w = torch.randn(2, 1, 5, 5, requires_grad=True)
    out = depthwise_conv2d(x, w, None, 1, 2, 1)
    assert type(out.grad_fn).__name__ == '_DepthwiseConv2dCPUBackward'
    with torch.no_grad():
        assert depthwise_conv2d(x, w, None, 1, 2, 1).grad_fn is None
    w3 = w[..., :3, :3]
    # a 3x3 takes it where the C++ library (csrc/dwconv3x3_cpu.cpp) is built, else F.conv2d
    own = type(depthwise_conv2d(x, w3, None, 1, 1, 1).grad_fn).__name__
    assert (own == '_DepthwiseConv2dCPUBackward') == na2d_cpu.is_available()
    # 3x3 on a channels-last input (oneDNN is fast there), without padding, or 1x1: F.conv2d
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    for plain in (depthwise_conv2d(x.double(), w.double(), None, 1, 2, 1),
                  depthwise_conv2d(x_cl, w3, None, 1, 1, 1),
                  depthwise_conv2d(x, w3, None, 1, 0, 1),
                  depthwise_conv2d(x, w[..., :1, :1], None, 1, 0, 1)):
        assert 'DepthwiseConv2dCPU' not in type(plain.grad_fn).__name__


def test_module_keeps_conv2d_state_dict():
    conv = torch.nn.Conv2d(4, 4, 7, padding=3, groups=4)
    ours = DWConv2d(4, 7, padding=3)
    ours.load_state_dict(conv.state_dict())
    assert list(ours.state_dict()) == ['weight', 'bias']
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(ours(x), conv(x), atol=1e-5, rtol=1e-5)


def test_contiguous_for_dwconv_on_cpu():
    # on CPU the layout is the CPU path's choice per kernel: no copy here, except for an input
    # shared by several small kernels (not under torch_depthwise(), the plain-PyTorch rows)
    x = torch.randn(1, 4, 6, 6).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert not x.is_contiguous()
    assert contiguous_for_dwconv(x) is x
    shared = contiguous_for_dwconv(x, small_kernels=True)
    assert shared.is_contiguous() and torch.equal(shared, x)
    with torch_depthwise():
        assert contiguous_for_dwconv(x, small_kernels=True) is x


@pytest.mark.parametrize('deploy,training', [(False, True), (False, False), (True, False)])
def test_reparam_block_on_a_channels_last_input(deploy, training):
    """DilatedReparamBlock on what LayerNorm2d hands it (channels-last strides): in training its
    branches run on one NCHW copy; in eval mode, and in the deploy form (one kernel), the convs
    take the input as given. Outputs and gradients are F.conv2d's in float64."""
    from overlock_mm.layers import DilatedReparamBlock
    torch.manual_seed(0)
    block = DilatedReparamBlock(6, 13, deploy=deploy).train(training)
    for bn in block.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 2)
            bn.bias.data.uniform_(-1, 1)
    ref_block = copy.deepcopy(block).double()
    x = torch.randn(2, 6, 23, 29, dtype=torch.float64)
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
             for m in block.modules() if isinstance(m, DWConv2d)]
    ours_x = x.float().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert not ours_x.is_contiguous()
    out = block(ours_x)
    for h in hooks:
        h.remove()
    assert len(inputs) == (1 if deploy else 1 + len(block.branches))
    assert all(t.is_contiguous() == training for t in inputs)
    ref_x = x.clone().requires_grad_()
    with torch_depthwise():
        ref = ref_block(ref_x)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    gy = torch.randn(ref.shape, dtype=torch.float64)
    params = [p for _, p in block.named_parameters()]
    ref_params = [p for _, p in ref_block.named_parameters()]
    grads = torch.autograd.grad(out, [ours_x] + params, gy.float())
    ref_grads = torch.autograd.grad(ref, [ref_x] + ref_params, gy)
    names = ['input'] + [n for n, _ in block.named_parameters()]
    for name, got, want in zip(names, grads, ref_grads):
        torch.testing.assert_close(got.double(), want, atol=5e-4, rtol=1e-4, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('k,d,p', [(13, 1, 6), (7, 2, 6), (3, 1, 1)])
def test_cuda_channels_last_input(k, d, p):
    """A channels-last-strided input (what LayerNorm2d returns) runs on a contiguous copy, with
    F.conv2d's results; under torch_depthwise() the input is used as given."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(2, 8, 30, 41, generator=g, dtype=torch.float64)
    wt = torch.randn(8, 1, k, k, generator=g, dtype=torch.float64)
    ref = F.conv2d(x, wt, None, 1, p, d, 8)
    xc = x.float().cuda().contiguous(memory_format=torch.channels_last)
    assert not xc.is_contiguous() and contiguous_for_dwconv(xc).is_contiguous()
    with torch_depthwise():
        assert contiguous_for_dwconv(xc) is xc
    out = depthwise_conv2d(xc, wt.float().cuda(), None, 1, p, d)
    torch.testing.assert_close(out.double().cpu(), ref, atol=1e-4, rtol=1e-4)
