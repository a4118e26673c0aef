"""UniRepLKNet's dilated re-parameterisable large-kernel block, as used by OverLoCK.

Facts (kernel/dilation tables, key names, fusion rule) from UniRepLKNet (Ding et al., CVPR 2024)
and the OverLoCK release; see docs/spec/ARCHITECTURE.md. Training form: a dense ``K x K``
depthwise conv and several dilated small depthwise convs, each followed by BatchNorm, summed.
Deploy form: one dense ``K x K`` depthwise conv with bias named ``lk_origin`` (the
``*_reparam.pth`` layout).
"""
from typing import Dict, Iterable, List, Mapping, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.dwconv import contiguous_for_dwconv
from .conv import DWConv2d
from .norm import BatchNorm2d

#: kernel size -> ((small kernel, dilation), ...) of the parallel dilated branches.
DILATED_BRANCHES: Dict[int, Tuple[Tuple[int, int], ...]] = {
    19: ((5, 1), (7, 1), (9, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
    17: ((5, 1), (7, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
    15: ((5, 1), (7, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
    13: ((5, 1), (7, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
    11: ((5, 1), (7, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    9: ((5, 1), (7, 1), (5, 2), (3, 3), (3, 4)),
    7: ((5, 1), (3, 1), (3, 2), (3, 3)),
    5: ((3, 1), (3, 2)),
}


BN_FIELDS = ('weight', 'bias', 'running_mean', 'running_var')


def fuse_bn(kernel: torch.Tensor, bn: Mapping[str, torch.Tensor],
            eps: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm (given by its :data:`BN_FIELDS`) into a bias-free conv."""
    scale = bn['weight'] / (bn['running_var'] + eps).sqrt()
    return kernel * scale.reshape(-1, 1, 1, 1), bn['bias'] - bn['running_mean'] * scale


def dilated_to_dense(kernel: torch.Tensor, dilation: int) -> torch.Tensor:
    """Spread a ``k x k`` kernel with dilation ``r`` into the equivalent dense kernel."""
    if dilation == 1:
        return kernel
    c, _, k, _ = kernel.shape
    size = dilation * (k - 1) + 1
    dense = kernel.new_zeros(c, 1, size, size)
    dense[:, :, ::dilation, ::dilation] = kernel
    return dense


def merge_branches(origin: torch.Tensor, origin_bn: Mapping[str, torch.Tensor],
                   branches: Iterable[Tuple[int, torch.Tensor, Mapping[str, torch.Tensor]]],
                   eps: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor]:
    """The one ``K x K`` kernel and bias equal to ``BN(origin) + sum BN(dilated branch)``.

    Args:
        origin: the dense ``[C, 1, K, K]`` kernel.
        origin_bn: its BatchNorm tensors.
        branches: ``(dilation, [C, 1, k, k] kernel, BatchNorm tensors)`` per branch.
    """
    size = origin.shape[-1]
    kernel, bias = fuse_bn(origin, origin_bn, eps)
    for dilation, w, bn in branches:
        bw, bb = fuse_bn(w, bn, eps)
        dense = dilated_to_dense(bw, dilation)
        pad = (size - dense.shape[-1]) // 2
        kernel = kernel + F.pad(dense, [pad] * 4)
        bias = bias + bb
    return kernel, bias


def _bn_tensors(bn: nn.BatchNorm2d) -> Dict[str, torch.Tensor]:
    return {f: getattr(bn, f) for f in BN_FIELDS}


class DilatedReparamBlock(nn.Module):
    """Sum of BN(depthwise conv) branches: one dense ``K x K`` plus dilated small kernels.

    Args:
        channels (int): number of channels (depthwise).
        kernel_size (int): the large kernel ``K``; one of :data:`DILATED_BRANCHES`.
        deploy (bool): build the fused single-conv form directly. Defaults to False.
    """

    def __init__(self, channels: int, kernel_size: int, deploy: bool = False) -> None:
        super().__init__()
        if kernel_size not in DILATED_BRANCHES:
            raise ValueError(f'DilatedReparamBlock has no branch table for kernel size '
                             f'{kernel_size}; valid sizes: {sorted(DILATED_BRANCHES)}.')
        self.channels = channels
        self.kernel_size = kernel_size
        self.branches: List[Tuple[int, int]] = list(DILATED_BRANCHES[kernel_size])
        self.lk_origin = DWConv2d(channels, kernel_size, padding=kernel_size // 2, bias=deploy)
        self.deploy = deploy
        if deploy:
            return
        self.origin_bn = BatchNorm2d(channels)
        for k, r in self.branches:
            self.add_module(f'dil_conv_k{k}_{r}',
                            DWConv2d(channels, k, padding=(r * (k - 1) + 1) // 2, dilation=r,
                                     bias=False))
            self.add_module(f'dil_bn_k{k}_{r}', BatchNorm2d(channels))

    @staticmethod
    def valid_kernel_sizes() -> List[int]:
        return sorted(DILATED_BRANCHES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # once for every branch; on CPU too in training, where the branches' backward gains
        # more than the copy costs (see ops/dwconv.py)
        x = contiguous_for_dwconv(x, small_kernels=self.training and not self.deploy)
        if self.deploy:
            return self.lk_origin(x)
        # Summed in place into the first BatchNorm's output, which no backward reads (BatchNorm
        # keeps its input): no fresh map per branch (det OverLoCK-T training step on CPU 1.09x).
        out = self.origin_bn(self.lk_origin(x))
        for k, r in self.branches:
            conv = getattr(self, f'dil_conv_k{k}_{r}')
            out.add_(getattr(self, f'dil_bn_k{k}_{r}')(conv(x)))
        return out

    @torch.no_grad()
    def fused_kernel(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The single ``K x K`` kernel and bias equal to the sum of all branches (eval mode)."""
        branches = [(r, getattr(self, f'dil_conv_k{k}_{r}').weight,
                     _bn_tensors(getattr(self, f'dil_bn_k{k}_{r}'))) for k, r in self.branches]
        # All BatchNorms are built with the same (default) eps.
        return merge_branches(self.lk_origin.weight, _bn_tensors(self.origin_bn), branches,
                              self.origin_bn.eps)

    def switch_to_deploy(self) -> None:
        """Replace the branches by one biased ``K x K`` depthwise conv named ``lk_origin``."""
        if self.deploy:
            return
        kernel, bias = self.fused_kernel()
        fused = DWConv2d(self.channels, self.kernel_size, padding=self.kernel_size // 2,
                         bias=True)
        fused.to(kernel.device, kernel.dtype)
        fused.weight.data.copy_(kernel)
        fused.bias.data.copy_(bias)
        del self.lk_origin, self.origin_bn
        for k, r in self.branches:
            delattr(self, f'dil_conv_k{k}_{r}')
            delattr(self, f'dil_bn_k{k}_{r}')
        self.lk_origin = fused
        self.deploy = True
