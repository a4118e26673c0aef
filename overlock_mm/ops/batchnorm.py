"""BatchNorm in training mode with a faster CPU path.

PyTorch's CPU BatchNorm computes the batch statistics and the output far from memory speed:
at OverLoCK-T's stage-1 detection map ``[1, 64, 200, 336]`` 4.9 ms forward and 5.1 ms backward,
where a copy of the map takes ~0.7 ms. The dilated re-parameterisation blocks run five to seven
BatchNorms per block on such maps (one per branch), and with ``memory_efficient`` their forward
runs twice. Our kernel (``csrc/batchnorm_cpu.cpp``, built with the ContMix one) takes ~1.0 and
~1.6 ms there (docs/performance.md).

:func:`batch_norm_train` is the training-mode computation only -- normalisation with the batch
statistics, which it returns for the caller's running averages. :class:`overlock_mm.layers.norm.
BatchNorm2d` uses it where :func:`fast_path_applies` and ``nn.BatchNorm2d`` everywhere else
(eval mode, CUDA, autocast, other dtypes or layouts, tracing and ``torch.compile``, no kernel
library). Outputs and gradients equal ``F.batch_norm``'s up to float32 summation order (the
sums are taken in double; tests/test_ops_batchnorm.py).
"""
from typing import Optional, Tuple

import torch

__all__ = ['batch_norm_train', 'fast_path_applies']


def fast_path_applies(x: torch.Tensor) -> bool:
    """Our kernel can normalise ``x`` in training: an NCHW-contiguous float32 CPU tensor with
    more than one value per channel, outside autocast, with no tracer or compiler looking (they
    see aten operations only), and the kernel library built."""
    if (x.device.type != 'cpu' or x.dtype != torch.float32 or x.dim() != 4
            or not x.is_contiguous() or x.numel() <= x.shape[1]
            or torch.is_autocast_enabled('cpu')):
        return False
    from .na2d_cpu import usable_eagerly
    return usable_eagerly()


class _BatchNormCPU(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        from .na2d_cpu import bn_forward
        out, mean, var, invstd = bn_forward(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        from .na2d_cpu import bn_backward
        x, weight, mean, invstd = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if not any(needs):
            return None, None, None, None
        gx, gw, gb = bn_backward(grad_out.contiguous(), x, weight, mean, invstd, needs)
        return gx, gw, gb, None


def batch_norm_train(x: torch.Tensor, weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], eps: float
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)`` of an ``x`` for
    which :func:`fast_path_applies`, and the batch's mean and biased variance per channel
    (detached: for the running averages)."""
    return _BatchNormCPU.apply(x, weight, bias, eps)
