"""overlock_mm.utils.activation_checkpoint: recomputation leaves BatchNorm buffers alone."""
import pytest
import torch
import torch.nn as nn

from overlock_mm.utils.activation_checkpoint import checkpoint_block, frozen_bn_statistics


@pytest.mark.parametrize('momentum', [0.1, None])  # None: cumulative moving average
def test_checkpointed_block_matches_plain_block(momentum):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=momentum),
                          nn.GELU()).train()
    ckpt = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=momentum),
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


def test_frozen_statistics_restores_on_error_and_skips_eval_layers():
    bn_train, bn_eval = nn.BatchNorm2d(2).train(), nn.BatchNorm2d(2).eval()
    model = nn.Sequential(bn_train, bn_eval)
    with pytest.raises(RuntimeError, match='boom'):
        with frozen_bn_statistics(model):
            assert bn_train.momentum == 0.0 and bn_eval.momentum == 0.1
            bn_train(torch.randn(4, 2, 3, 3))
            raise RuntimeError('boom')
    assert bn_train.momentum == 0.1
    assert bn_train.num_batches_tracked.item() == 0
    assert torch.equal(bn_train.running_mean, torch.zeros(2))
