"""Depthwise convolution with a faster CPU path (large kernels, training).

OverLoCK (like UniRepLKNet and MogaNet) is built on large depthwise kernels: 17x17 / 15x15 /
13x13 plus dilated re-parameterisation branches. On CPUs, PyTorch's oneDNN depthwise convolution
has five slow spots (1-4, 6), and the blocks hand it a layout that matters (5.) (measured side
by side, per case, by ``tools/analysis/benchmark.py --dwconv``; figures in docs/performance.md):

1. *The weight gradient* is 10-30x slower than the forward. ``grad_w[c, a, b] = sum_{n,i,j}
   x_pad[n, c, i + a*d, j + b*d] * grad_out[n, c, i, j]`` is, per sample, a depthwise
   convolution of the padded input with ``grad_out[n]`` as an ``H x W`` kernel (stride ``d`` =
   the dilation) whose output is the ``k x k`` weight gradient. oneDNN runs that shape fast at
   stride 16 (~130 GFLOP/s) but not at stride 4 (7-33 GFLOP/s at OverLoCK-T's ``[1, 64, 200,
   336]``, K = 17 / 7 / 5), so our kernel (``csrc/dwconv_kxk_cpu.cpp``) computes it:
   2.3-6.3x faster there, about equal at stride 16. Without the kernel library it is those
   oneDNN convolutions, samples summed in a loop (one grouped call was slower).
2. *The NCHW forward with a kernel extent >= 15* leaves oneDNN's fast path (k=13: 15 ms,
   k=15: 201 ms at ``[1, 64, 128, 208]``; channels-last: 19 ms, but slower than NCHW for small
   kernels). Those kernels run in channels-last and the result is returned in NCHW; a 9x9
   dilation-2 kernel (slow in both layouts) runs as its dense 17x17 equivalent.
3. *The input gradient of dilated kernels* (oneDNN's backward-data) is slow as well; it is
   computed as a forward convolution with the flipped kernel, through the same layout choice.

4. *3x3 kernels* ("same" padding, dilated ones included: the re-parameterisation branches) on
   NCHW-contiguous maps: oneDNN's NCHW depthwise 3x3 is far from memory speed (at OverLoCK-T's
   stage-1 MLP map ``[1, 256, 200, 336]``: forward 77 ms, weight gradient 59 ms). Our kernel
   (``csrc/dwconv3x3_cpu.cpp``, built with the ContMix one) runs them, 28.8 and 7.5 ms (the
   forward's 69 MB output alone costs ~20 ms of page faults); the input gradient is its forward
   with the flipped kernel, and ``ResDWConv``'s residual (``x + conv(x)``) is added in the same
   pass, both ways. On a channels-last input oneDNN is mostly fast and keeps them.
5. *An input shared by several small kernels*: ``DilatedReparamBlock`` gets a channels-last
   strided map from ``LayerNorm2d`` and runs five to seven kernels on it. There oneDNN's weight
   gradients went through a padded copy each and its dilation-7 3x3 was slow (11 ms against our
   kernel's 2.4 ms at ``[1, 64, 200, 336]``). In training, one NCHW copy for all the branches
   (:func:`contiguous_for_dwconv` with ``small_kernels``) made the OverLoCK-T training step
   1.06-1.17x faster (detection, segmentation, classification). In eval mode it is not made:
   forward only, it measured 1.08x at the detection size but 0.94-0.97x at the others
   (docs/performance.md).
6. *Large maps*: at stride 4 of detection and segmentation inputs oneDNN's forward of the other
   kernels runs at 20-60 GFLOP/s in either layout (point 2's channels-last route also costs two
   layout copies, and a 9x9 dilation-2 kernel 3.6x the taps as a dense 17x17). From
   :data:`OWN_FORWARD_MIN_PIXELS` pixels per map on, our kernel (``csrc/dwconv_kxk_cpu.cpp``)
   runs the forward of an NCHW-contiguous input, dilation included, and so the input gradient
   (point 3): all of OverLoCK-T's depthwise convolutions at 1344x800, forward+backward, 1.28x
   faster than with oneDNN's forward. On smaller maps oneDNN's NCHW kernel is faster, and on a
   channels-last input (eval mode, point 5) oneDNN runs in place; both keep oneDNN, except a
   large dilated kernel (:func:`_own_forward`).

Everything else -- autocast, other dtypes, strides, grouped-but-not-depthwise convolutions -- is
plain ``F.conv2d``. Outputs and gradients equal ``F.conv2d``'s up to float32 summation order
(tests/test_ops_dwconv.py).

On CUDA the convolution is ``F.conv2d``'s choice: PyTorch's own depthwise kernels for an
NCHW-contiguous input, cuDNN's grouped direct kernels for a channels-last-strided one -- several
times slower, and that is what ``LayerNorm2d`` (a permuted ``F.layer_norm``) and every layer
after it hand over. Such an input is made contiguous first (:func:`contiguous_for_dwconv`; one
copy, a few microseconds of GPU time per map); ``DilatedReparamBlock`` does it once for all of
its branches. On an H200 that halved an OverLoCK-T detection training step's GPU time
(docs/performance.md).
"""
import contextlib
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['contiguous_for_dwconv', 'depthwise_conv2d', 'torch_depthwise']

#: oneDNN's NCHW depthwise forward leaves its fast path once the kernel's extent reaches 15
#: (measured: k=13 15 ms, k=15 201 ms at [1, 64, 128, 208]); channels-last stays fast there.
CHANNELS_LAST_MIN_EXTENT = 15
#: From this many pixels per map on, other kernels than 3x3 run forward in our kernel
#: (csrc/dwconv_kxk_cpu.cpp): 1.2-3.6x oneDNN's at [1, 64, 200, 336] (K = 5-17) and 1.2-1.3x at
#: 128x128 / 100x168 (K = 15-17), but 0.7-0.9x at 50x84 and 0.3x at 14x14, where oneDNN's NCHW
#: kernel is fast (point 6 of the module docstring).
OWN_FORWARD_MIN_PIXELS = 128 * 128
_fast_paths = True


@contextlib.contextmanager
def torch_depthwise() -> Iterator[None]:
    """Within the block, every :func:`depthwise_conv2d` is plain ``F.conv2d`` on its input as
    given (for benchmarks: what the CPU path and the CUDA layout choice save, side by side in one
    run)."""
    global _fast_paths
    previous, _fast_paths = _fast_paths, False
    try:
        yield
    finally:
        _fast_paths = previous


def contiguous_for_dwconv(x: torch.Tensor, small_kernels: bool = False) -> torch.Tensor:
    """``x`` in the layout depthwise convolutions run fastest in: NCHW-contiguous on CUDA (module
    docstring). On CPU the path picks its layout per kernel, so ``x`` itself -- unless
    ``small_kernels``: an input shared by several small kernels (``DilatedReparamBlock``'s
    branches; point 5 of the module docstring) is made NCHW-contiguous there too."""
    if _fast_paths and (x.is_cuda or small_kernels) and not x.is_contiguous():
        return x.contiguous()
    return x


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             padding: Tuple[int, int], dilation: Tuple[int, int],
             residual: bool = False) -> torch.Tensor:
    """The convolution itself (plus ``x`` if ``residual``): our 3x3 kernel, or oneDNN in the
    layout it runs fastest for this kernel."""
    if _own_3x3(x, weight.shape, padding, dilation):
        from .na2d_cpu import dw3x3_forward
        return dw3x3_forward(x, weight, bias, _pair(dilation)[0], residual)
    if _own_forward(x, weight.shape, dilation):
        from .na2d_cpu import dw_forward
        out = dw_forward(x, weight, bias, padding, dilation)
    else:
        out = _onednn_forward(x, weight, bias, padding, dilation)
    return x + out if residual else out


def _onednn_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    padding: Tuple[int, int], dilation: Tuple[int, int]) -> torch.Tensor:
    kh, kw = weight.shape[-2:]
    (dh, dw) = dilation
    if _channels_last_route(weight.shape, dilation):
        if (dh, dw) != (1, 1):
            # A large dilated kernel (9x9, dilation 2) is slow in both layouts; as a dense
            # kernel with zeros between the taps it runs on the fast large-kernel path.
            dense = weight.new_zeros(weight.shape[:2] + (dh * (kh - 1) + 1, dw * (kw - 1) + 1))
            dense[:, :, ::dh, ::dw] = weight
            weight, dilation = dense, (1, 1)
        x = x.contiguous(memory_format=torch.channels_last)
        return F.conv2d(x, weight, bias, 1, padding, dilation, x.shape[1]).contiguous()
    return F.conv2d(x, weight, bias, 1, padding, dilation, x.shape[1])


def _channels_last_route(weight_shape, dilation) -> bool:
    """:func:`_onednn_forward` runs this kernel channels-last (point 2): at least 9x9, extent
    >= :data:`CHANNELS_LAST_MIN_EXTENT`; a dilated one as its dense equivalent."""
    (kh, kw), (dh, dw) = weight_shape[-2:], _pair(dilation)
    return (min(kh, kw) >= 9
            and max(dh * (kh - 1) + 1, dw * (kw - 1) + 1) >= CHANNELS_LAST_MIN_EXTENT)


def _grad_input(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                padding: Tuple[int, int], dilation: Tuple[int, int],
                residual: bool = False) -> torch.Tensor:
    """The transposed convolution = a forward convolution with the flipped kernel (stride 1);
    plus ``grad_out`` itself for ``residual`` (``x + conv(x)``), in the same pass where our 3x3
    kernel runs.

    Run through :func:`_forward` because oneDNN's own backward-data is slow for dilated kernels
    (7x7 dilation 2 at [1, 64, 128, 208]: 126 ms vs 4 ms as a forward).
    """
    kh, kw = weight.shape[-2:]
    full = (dilation[0] * (kh - 1) - padding[0], dilation[1] * (kw - 1) - padding[1])
    if min(full) < 0:  # padding beyond the kernel's extent: not a plain convolution any more
        grad = torch.ops.aten.convolution_backward(
            grad_out, x, weight, None, [1, 1], list(padding), list(dilation), False, [0, 0],
            x.shape[1], [True, False, False])[0]
        return grad_out + grad if residual else grad
    return _forward(grad_out, weight.flip(-1, -2), None, full, dilation, residual)


def _grad_weight(x: torch.Tensor, grad_out: torch.Tensor, weight_shape: torch.Size,
                 padding: Tuple[int, int], dilation: Tuple[int, int]) -> torch.Tensor:
    if _own_3x3(x, weight_shape, padding, dilation) and grad_out.is_contiguous():
        from .na2d_cpu import dw3x3_grad_weight
        return dw3x3_grad_weight(x, grad_out, _pair(dilation)[0]).view(weight_shape)
    if _own_kernels():
        from .na2d_cpu import dw_grad_weight
        return dw_grad_weight(x, grad_out, tuple(weight_shape[-2:]), padding, dilation)
    return _onednn_grad_weight(x, grad_out, weight_shape, padding, dilation)


def _onednn_grad_weight(x: torch.Tensor, grad_out: torch.Tensor, weight_shape: torch.Size,
                        padding: Tuple[int, int], dilation: Tuple[int, int]) -> torch.Tensor:
    """The weight gradient as oneDNN convolutions (point 1 of the module docstring), where the
    kernel library is not built."""
    c = x.shape[1]
    (ph, pw), (dh, dw) = padding, dilation
    kh, kw = weight_shape[-2:]
    x_pad = F.pad(x, (pw, pw, ph, ph))
    # The output of each call is [1, C, kh, kw] exactly when the padding is "valid" for the
    # kernel: H + 2p - dh * (kh - 1) == H_out, true for every stride-1 convolution.
    grad = None
    for n in range(x.shape[0]):
        g = F.conv2d(x_pad[n:n + 1], grad_out[n].unsqueeze(1), None, (dh, dw), 0, 1, c)
        grad = g if grad is None else grad + g
    return grad[:, :, :kh, :kw].reshape(weight_shape)


class _DepthwiseConv2dCPU(torch.autograd.Function):
    """Forward: oneDNN (channels-last for large kernels); backward: see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding, dilation, residual):
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.dilation, ctx.has_bias = padding, dilation, bias is not None
        ctx.residual = residual
        return _forward(x, weight, bias, padding, dilation, residual)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _grad_input(grad_out, x, weight, ctx.padding, ctx.dilation, ctx.residual)
        if ctx.needs_input_grad[1]:
            grad_w = _grad_weight(x, grad_out, weight.shape, ctx.padding, ctx.dilation)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _own_3x3(x: torch.Tensor, weight_shape, padding, dilation) -> bool:
    """Our kernel (csrc/dwconv3x3_cpu.cpp) runs this convolution: 3x3, dilation d in both
    directions with padding d ("same"), an NCHW-contiguous input (oneDNN is fast on a
    channels-last one), and :func:`_own_kernels`."""
    d = _pair(dilation)
    if (tuple(weight_shape[-2:]) != (3, 3) or d[0] != d[1] or _pair(padding) != d
            or not x.is_contiguous()):
        return False
    return _own_kernels()


def _own_forward(x: torch.Tensor, weight_shape, dilation) -> bool:
    """Our K x K kernel (csrc/dwconv_kxk_cpu.cpp) runs this forward: a map of at least
    :data:`OWN_FORWARD_MIN_PIXELS` pixels, NCHW-contiguous. On a channels-last input oneDNN
    runs in place (small kernels) or with one copy back (extent >= 15), faster than ours after
    copying the input -- except a large dilated kernel, which oneDNN runs as its dense
    equivalent (at [1, 64, 200, 336]: 7x7 3.7 against 13.6 ms, 17x17 25.4 against 30.1 ms,
    9x9 dilation 2 25.4 against 14.9 ms)."""
    if x.shape[-2] * x.shape[-1] < OWN_FORWARD_MIN_PIXELS:
        return False
    densified = _channels_last_route(weight_shape, dilation) and _pair(dilation) != (1, 1)
    if not x.is_contiguous() and not densified:
        return False
    return _own_kernels()


def _own_kernels() -> bool:
    """Our kernels can run (:func:`overlock_mm.ops.na2d_cpu.usable_eagerly`), imported at call
    time like the kernels themselves: na2d_cpu imports the neighborhood module, which imports it
    back."""
    from .na2d_cpu import usable_eagerly
    return usable_eagerly()


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     stride=1, padding=0, dilation=1, residual: bool = False) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)`` for
    ``weight [C, 1, kh, kw]``; ``x + `` that if ``residual`` (ResDWConv: one pass over the map,
    forward and backward, where our 3x3 kernel runs).

    Takes the faster CPU path (module docstring) for float32 CPU tensors at stride 1 outside
    autocast (undilated 3x3 kernels only with padding 1 and an NCHW-contiguous input); on CUDA
    ``F.conv2d`` on a contiguous input (:func:`contiguous_for_dwconv`); every other case is
    ``F.conv2d``.
    """
    c = weight.shape[0]
    x = contiguous_for_dwconv(x)
    small = max(weight.shape[-2:]) <= 3 and _pair(dilation) == (1, 1)
    if (_fast_paths and x.dim() == 4 and x.shape[1] == c and weight.shape[1] == 1
            and x.device.type == 'cpu' and x.dtype == torch.float32
            and weight.dtype == torch.float32
            and _pair(stride) == (1, 1) and not isinstance(padding, str)
            and not torch.is_autocast_enabled('cpu')
            and (not small or _own_3x3(x, weight.shape, padding, dilation))):
        padding, dilation = _pair(padding), _pair(dilation)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
        if needs_grad and not torch.jit.is_tracing():
            return _DepthwiseConv2dCPU.apply(x, weight, bias, padding, dilation, residual)
        # inference: the forward alone (our 3x3 kernel, or oneDNN in its fastest layout); under
        # a tracer (e.g. FLOP counting) every path of _forward is a plain aten convolution
        return _forward(x, weight, bias, padding, dilation, residual)
    out = F.conv2d(x, weight, bias, stride, padding, dilation, c)
    return x + out if residual else out
