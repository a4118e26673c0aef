"""overlock_mm.utils.activation_checkpoint: recomputation leaves BatchNorm buffers alone and
keeps only what it should."""
import contextlib

import pytest
import torch
import torch.nn as nn

from autograd_utils import saved_storages
from overlock_mm.layers import BatchNorm2d
from overlock_mm.utils.activation_checkpoint import (_skips_count_without_buffer,
                                                     checkpoint_block, frozen_bn_statistics,
                                                     sequential_with_recompute)


# nn.SyncBatchNorm: what sync_bn='torch' turns every BatchNorm into under DDP; it refuses a None
# num_batches_tracked, and in one process it runs as a plain BatchNorm. BatchNorm2d: ours (a CPU
# kernel in training), frozen like nn.BatchNorm2d by setting the count's buffer aside.
@pytest.mark.parametrize('norm', [nn.BatchNorm2d, nn.SyncBatchNorm, BatchNorm2d])
@pytest.mark.parametrize('momentum', [0.1, None])  # None: cumulative moving average
def test_checkpointed_block_matches_plain_block(norm, momentum):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), norm(4, momentum=momentum),
                          nn.GELU()).train()
    ckpt = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), norm(4, momentum=momentum),
                         nn.GELU()).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 8, 8)
    out_plain = plain(x.clone().requires_grad_())
    out_ckpt = checkpoint_block(ckpt, x.clone().requires_grad_())
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    out_plain.square().sum().backward()
    out_ckpt.square().sum().backward()  # the recomputation happens here
    for (n, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=n)
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=n)
    assert ckpt[1].momentum == momentum  # restored
    assert ckpt[1].num_batches_tracked.item() == 1
    assert _skips_count_without_buffer(ckpt[1]) == (norm is not nn.SyncBatchNorm)


def test_frozen_statistics_restores_on_error_and_skips_eval_layers():
    bn_train, bn_eval = nn.BatchNorm2d(2).train(), nn.BatchNorm2d(2).eval()
    model = nn.Sequential(bn_train, bn_eval)
    with pytest.raises(RuntimeError, match='boom'):
        with frozen_bn_statistics(model):
            assert bn_train.momentum == 0.0 and bn_eval.momentum == 0.1
            assert bn_train.num_batches_tracked is None and bn_eval.num_batches_tracked == 0
            bn_train(torch.randn(4, 2, 3, 3))
            raise RuntimeError('boom')
    assert bn_train.momentum == 0.1
    assert bn_train.num_batches_tracked.item() == 0
    assert 'num_batches_tracked' in dict(bn_train.named_buffers())
    assert torch.equal(bn_train.running_mean, torch.zeros(2))
    assert torch.equal(bn_train.running_var, torch.ones(2))


def test_frozen_statistics_covers_norm_layers_that_are_not_batchnorm():
    """InstanceNorm with running statistics is not a ``_BatchNorm`` (nor is mmcv's
    SyncBatchNorm, which needs a process group and a GPU): its buffers must stay put too."""
    norm = nn.InstanceNorm2d(2, track_running_stats=True).train()
    x = torch.randn(4, 2, 3, 3) * 3 + 1
    with frozen_bn_statistics(norm):
        out = norm(x)
    assert torch.equal(norm.running_mean, torch.zeros(2))
    assert torch.equal(norm.running_var, torch.ones(2))
    assert norm.momentum == 0.1 and norm.num_batches_tracked.item() == 0
    torch.testing.assert_close(out, nn.InstanceNorm2d(2)(x))  # normalised with its own stats


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.GELU(),
                         nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4), nn.GELU(),
                         nn.Conv2d(4, 2, 1)).train()


def test_sequential_with_recompute_matches_plain_and_keeps_less():
    torch.manual_seed(0)
    plain, lean = _net(), _net()
    lean.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 8, 8)
    xp, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    # feature maps only (>= 1 KiB here), not weights or BatchNorm statistics
    out_plain, kept_plain = saved_storages(lambda: plain(xp), min_bytes=1024)
    out_lean, kept_lean = saved_storages(lambda: sequential_with_recompute(lean, xl, [(1, 6)]),
                                         min_bytes=1024)
    torch.testing.assert_close(out_lean, out_plain, rtol=0, atol=0)
    # Plain: the inputs of layers 0-6 (7 maps, x included). Recomputing layers 1-5 keeps only
    # x, their input (layer 0's output) and layer 6's input.
    assert len(kept_plain) == 7
    assert len(kept_lean) == 3
    out_plain.square().sum().backward()
    out_lean.square().sum().backward()
    torch.testing.assert_close(xl.grad, xp.grad)
    for (n, a), b in zip(plain.named_parameters(), lean.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=n)
    for (n, a), b in zip(plain.state_dict().items(), lean.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=n)  # BN statistics moved once


@pytest.mark.parametrize('ranges', [[(2, 1)], [(0, 3), (2, 5)], [(0, 8)], [(3, 3)]])
def test_sequential_with_recompute_rejects_bad_ranges(ranges):
    with pytest.raises(ValueError, match='bad range'):
        sequential_with_recompute(_net(), torch.randn(1, 3, 4, 4), ranges)


def _compare_recompute(plain: nn.Module, lean: nn.Module, ranges, x: torch.Tensor,
                       x_grad: bool = True, **autocast) -> None:
    """Forward (under ``autocast`` if given) and backward of ``plain`` and of ``lean`` with
    ``ranges`` recomputed: outputs, gradients and buffers must agree."""
    lean.load_state_dict(plain.state_dict())
    xp, xl = x.clone().requires_grad_(x_grad), x.clone().requires_grad_(x_grad)
    ctx = (torch.autocast(x.device.type, **autocast) if autocast
           else contextlib.nullcontext())
    with ctx:
        out_plain = plain(xp)
        out_lean = sequential_with_recompute(lean, xl, ranges)
    assert out_lean.dtype == out_plain.dtype
    torch.testing.assert_close(out_lean, out_plain, rtol=0, atol=0)
    # backward outside autocast, as torch.autocast's documentation asks
    out_plain.float().square().sum().backward()
    out_lean.float().square().sum().backward()
    if x_grad:
        torch.testing.assert_close(xl.grad, xp.grad)
    for (n, a), b in zip(plain.named_parameters(), lean.parameters()):
        assert (a.grad is None) == (b.grad is None), n
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, msg=n)
    for (n, a), b in zip(plain.state_dict().items(), lean.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=n)


DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs CUDA'))]


@pytest.mark.parametrize('device', DEVICES)
def test_recompute_runs_under_the_forwards_autocast(device):
    """The recomputation happens in backward, outside the caller's autocast: it must enter the
    first forward's autocast again, or it would compute in float32 what the forward computed in
    half precision (other values, and a gradient of another dtype)."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == 'cpu' else torch.float16
    plain, lean = _net().to(device), _net().to(device)
    _compare_recompute(plain, lean, [(0, 3), (3, 6)], torch.randn(2, 3, 8, 8, device=device),
                       dtype=dtype)


def test_recompute_shared_and_frozen_parameters_and_input_without_grad():
    """A layer used twice, and a weight tied between two layers, get their gradients once
    (summed over the uses, as without recomputation); a frozen parameter gets none; an input
    that needs no gradient gets none."""
    torch.manual_seed(0)

    def net():
        conv = nn.Conv2d(4, 4, 3, padding=1)
        tied = nn.Conv2d(4, 4, 3, padding=1)
        tied.weight = conv.weight
        seq = nn.Sequential(nn.Conv2d(3, 4, 1), conv, nn.BatchNorm2d(4), nn.GELU(), conv, tied,
                            nn.Conv2d(4, 2, 1)).train()
        seq[0].bias.requires_grad_(False)
        return seq

    _compare_recompute(net(), net(), [(0, 6)], torch.randn(2, 3, 6, 6), x_grad=False)
    _compare_recompute(net(), net(), [(1, 6)], torch.randn(2, 3, 6, 6))


def test_recompute_refuses_dropout():
    seq = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Dropout(0.1)).train()
    with pytest.raises(ValueError, match='Dropout draws random numbers'):
        sequential_with_recompute(seq, torch.randn(1, 3, 4, 4, requires_grad=True), [(0, 2)])
    seq.eval()  # no randomness in eval mode
    sequential_with_recompute(seq, torch.randn(1, 3, 4, 4, requires_grad=True), [(0, 2)])
    from mmcv.cnn.bricks import DropPath
    seq = nn.Sequential(nn.Conv2d(3, 3, 1), DropPath(0.2)).train()
    with pytest.raises(ValueError, match='DropPath draws random numbers'):
        sequential_with_recompute(seq, torch.randn(1, 3, 4, 4, requires_grad=True), [(0, 2)])
    seq[1].drop_prob = 0.  # a zero rate draws nothing
    sequential_with_recompute(seq, torch.randn(1, 3, 4, 4, requires_grad=True), [(0, 2)])


class _TwoOutputs(nn.Module):
    """A block like the Focus-Net's: several inputs (one of them passed twice), drop path,
    BatchNorm, and a tuple of two views and a ``None`` out."""

    def __init__(self):
        super().__init__()
        from mmcv.cnn.bricks import DropPath
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = DropPath(0.5)

    def forward(self, x, a, b):
        y = x + self.drop(self.bn(self.conv(x * a + b)))
        return y[:, :2], y[:, 2:], None


@pytest.mark.parametrize('device', DEVICES)
def test_checkpoint_block_replays_random_numbers_and_takes_tuples(device):
    """checkpoint_block recomputes a drop-path block: its masks must repeat (the generators
    are replayed), and the generators must end where the plain forward leaves them."""
    torch.manual_seed(0)
    plain, ckpt = _TwoOutputs().to(device).train(), _TwoOutputs().to(device).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(8, 4, 5, 5, device=device)
    a = torch.randn(8, 4, 5, 5, device=device)
    grads, states = [], []
    for model, run in ((plain, lambda m, *t: m(*t)), (ckpt, checkpoint_block)):
        xi, ai = x.clone().requires_grad_(), a.clone().requires_grad_()
        torch.manual_seed(1)
        y0, y1, none = run(model, xi, ai, ai)
        assert none is None
        torch.rand(3, device=device)  # the generator moves on between forward and backward
        (y0.square().sum() + 2 * y1.sum()).backward()  # the recomputation happens here
        states.append(torch.rand(3, device=device))  # where the generator stands now
        grads.append([xi.grad, ai.grad] + [p.grad for p in model.parameters()])
    assert len(grads[1]) == len(grads[0])
    for g_ckpt, g_plain in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_ckpt, g_plain)
    torch.testing.assert_close(states[1], states[0], rtol=0, atol=0)
    for (n, p), c in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        torch.testing.assert_close(c, p, rtol=0, atol=0, msg=n)
