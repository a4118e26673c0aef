"""Whole-backbone check of the fast paths: outputs and parameter gradients of OverLoCK with the
auto-selected ContMix op and the CPU depthwise-conv path equal those of the same weights on the
F.unfold reference formulation with PyTorch's own depthwise convolution (detection layout). Two
inputs: 96 px, whose stage-3/4 maps are smaller than the kernels (resized up), and 224 px, whose
14x14 stage-3 map takes the CPU kernel's compiled blocks (the pixel-major grad_value scatter
among them) and its 7x7 stage-4 map the generic ones."""
import contextlib

import pytest
import torch

from overlock_mm import OverLoCK
from overlock_mm.ops.dwconv import torch_depthwise


def _outputs_and_grads(model, x, impl, plain_dwconv):
    model.zero_grad()
    for m in model.modules():
        if hasattr(m, 'contmix_impl'):
            m.contmix_impl = impl
    with torch_depthwise() if plain_dwconv else contextlib.nullcontext():
        outs = model(x)
        # a loss that weights every output element differently (a plain sum would hide errors
        # that cancel out)
        loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)
        loss.backward()
    return ([o.detach() for o in outs],
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize('size', [96, 224])
def test_fast_paths_match_reference_gradients(size):
    torch.manual_seed(0)
    model = OverLoCK('xt', layout='det', out_indices=(0, 1, 2, 3), drop_path_rate=0.).train()
    x = torch.randn(2, 3, size, size)
    ours, g_ours = _outputs_and_grads(model, x, 'auto', plain_dwconv=False)
    ref, g_ref = _outputs_and_grads(model, x, 'reference', plain_dwconv=True)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=1e-4)
    assert set(g_ours) == set(g_ref)
    scale = max(g.norm().item() for g in g_ref.values())
    for name, g in g_ref.items():
        # gradients that are zero in exact arithmetic (e.g. the bias of a BN followed by another
        # BN) come out as float32 noise of ~1e-6 of the largest gradient: compare against a floor
        err = (g_ours[name] - g).norm().item() / max(g.norm().item(), 1e-4 * scale)
        assert err < 1e-3, (name, err, g.norm().item())
