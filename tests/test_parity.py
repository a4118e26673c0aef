"""Numerical parity with the authors' implementation (reference outputs in parity_visible.pt).

The file (copied from the project's spec) holds a small random network in the classification and
detection layouts, its inputs and the outputs the authors' code produced.
"""
from pathlib import Path

import pytest
import torch

from overlock_mm import OverLoCK
from overlock_mm.ops import available_impls

PARITY = Path(__file__).parent / 'data' / 'parity_visible.pt'
TOL = 1e-4


@pytest.fixture(scope='module')
def ref():
    return torch.load(PARITY, weights_only=True)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
#: every parity test runs on the CPU and, where present, on CUDA (the GPU paths: 'auto' is
#: 'triton' where triton is installed)
DEVICES = ['cpu', pytest.param('cuda', marks=needs_cuda)]


@pytest.fixture
def no_tf32(request, monkeypatch):
    """Full float32 on the GPU: cuDNN convolutions use TF32 by default, which alone moves the
    outputs by ~1e-3. (Nothing to do on the CPU, where a CPU-only torch may lack the flags.)"""
    if request.node.callspec.params.get('device') != 'cuda':
        return
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)


def our_arch(a):
    """The authors' argument names -> ours."""
    return dict(depths=a['depth'], sub_depths=a['sub_depth'], embed_dims=a['embed_dim'],
                kernel_sizes=a['kernel_size'], num_heads=a['sub_num_heads'],
                mlp_ratio=a['mlp_ratio'], sub_mlp_ratio=a['sub_mlp_ratio'])


def build_classifier(ref, **kw):
    pytest.importorskip('mmpretrain')  # the classification head (a GPU box may lack mmpretrain)
    from overlock_mm.heads import OverLoCKClsHead
    arch = our_arch(ref['arch'])
    backbone = OverLoCK(arch, layout='cls', out_indices=(3, 4), **kw)
    c3 = arch['embed_dims'][3]
    head = OverLoCKClsHead(num_classes=10, in_channels=c3 + c3 // 4, aux_in_channels=c3)
    sd = ref['cls']['state_dict']
    head_sd = {k: v for k, v in sd.items() if k.startswith(('head.', 'aux_head.'))}
    backbone.load_state_dict({k: v for k, v in sd.items() if k not in head_sd}, strict=True)
    head.load_state_dict(head_sd, strict=True)
    return backbone.eval(), head.eval()


def max_err(a, b):
    return (a.float().cpu() - b.float()).abs().max().item()


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('impl', ['auto'] + available_impls())
def test_classification_parity(ref, impl, device, no_tf32):
    backbone, head = build_classifier(ref, contmix_impl=impl)
    backbone, head = backbone.to(device), head.to(device)
    with torch.no_grad():
        final, overview = backbone(ref['cls']['input'].to(device))
        logits = head((final, overview))
    assert max_err(final, ref['cls']['final_features']) <= TOL
    assert max_err(overview, ref['cls']['overview_features']) <= TOL
    assert max_err(logits, ref['cls']['logits']) <= TOL


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('impl', ['auto'] + available_impls())
def test_detection_parity(ref, impl, device, no_tf32):
    model = OverLoCK(our_arch(ref['arch']), layout='det', contmix_impl=impl)
    model.load_state_dict(ref['det']['state_dict'], strict=True)
    model = model.to(device).eval()
    for x, expected in zip(ref['det']['inputs'], ref['det']['outputs']):
        with torch.no_grad():
            outs = model(x.to(device))
        assert len(outs) == len(expected) == 4
        for o, e in zip(outs, expected):
            assert o.shape == e.shape
            assert max_err(o, e) <= TOL


def test_switch_to_deploy_keeps_outputs(ref):
    backbone, head = build_classifier(ref)
    x = ref['cls']['input']
    with torch.no_grad():
        before = head(backbone(x))
        backbone.switch_to_deploy()
        after = head(backbone(x))
    assert not any('origin_bn' in k for k in backbone.state_dict())
    assert max_err(before, after) <= TOL
    assert max_err(after, ref['cls']['logits']) <= TOL

    det = OverLoCK(our_arch(ref['arch']), layout='det').eval()
    det.load_state_dict(ref['det']['state_dict'])
    xin = ref['det']['inputs'][0]
    with torch.no_grad():
        before = det(xin)
        det.switch_to_deploy()
        after = det(xin)
    for b, a in zip(before, after):
        assert max_err(b, a) <= TOL
