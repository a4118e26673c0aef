"""The Triton ``na2d_av`` kernels, run on CPU tensors through Triton's interpreter.

``triton.jit`` picks the interpreter when it decorates a function, from ``TRITON_INTERPRET``
(read on every access of ``triton.knobs.runtime.interpret`` in triton 3.8). Triton's own ``@jit``
library helpers (``tl.sum``, ``tl.max``, ``tl.cdiv``, ``tl.zeros``) are decorated when triton is
imported, so kernels using them could only be interpreted with the variable set before
``import triton``; :mod:`overlock_mm.ops.na2d_triton` uses builtins only and decorates its kernels
lazily, cached per setting, so the ``interpreter`` fixture just sets the variable for each test,
in this process, after this module has imported triton (exactly the case that matters).

The interpreter executes every ``tl`` op as a NumPy call per program, so the cases are small and
most use a larger pixel tile (fewer programs); one case keeps the default tile so several programs
share a map. Ground truth: the ``F.unfold`` reference in float64 and its autograd gradients.
"""
import functools

import numpy as np
import pytest
import torch

triton = pytest.importorskip('triton')
tl = pytest.importorskip('triton.language')

from overlock_mm.ops import available_impls, na2d_av_reference, neighborhood  # noqa: E402
from overlock_mm.ops import na2d_triton as nt  # noqa: E402

TOL = 1e-4  # float32 kernels vs the float64 reference

# (k, H, W, D, B, G, tiles): H or W == k, a bit larger than k, non-square, L = 2k - 1 (the
# longest inverse range, 7 -> 13), k = 3 to 17, the default tiles and small ones (several column
# tiles per row: (BLOCK_J of forward and grad_attn, BLOCK_Q of grad_value)), and k = 17 with
# 16-column grad_value tiles, whose border tiles need two 32-column chunks of output columns
# (source columns 16..31: output columns 0..44, 45 of them).
CASES = [
    (3, 3, 5, 8, 2, 1, None),
    (5, 7, 5, 10, 1, 2, None),
    (7, 9, 8, 16, 1, 2, None),
    (7, 13, 9, 8, 2, 1, (4, 4)),
    (13, 13, 14, 8, 1, 2, None),
    (5, 7, 23, 10, 1, 2, (4, 2)),
    (17, 18, 17, 8, 1, 1, None),
    (3, 9, 40, 8, 1, 2, (8, 4)),
    (5, 11, 40, 10, 1, 1, (16, 16)),
    (17, 18, 45, 4, 1, 1, (16, 16)),
]


def _set_tiles(monkeypatch, block_j=None, block_q=None, block_d=None):
    """Patch ``nt.TILES`` (a copy) for one test; ``None`` keeps a value."""
    tiles = {name: dict(cfg) for name, cfg in nt.TILES.items()}
    for cfg in tiles.values():
        for key, val in (('BLOCK_J', block_j), ('BLOCK_Q', block_q), ('BLOCK_D', block_d)):
            if val is not None and key in cfg:
                cfg[key] = val
    monkeypatch.setattr(nt, 'TILES', tiles)
    monkeypatch.delenv(nt.TILES_ENV, raising=False)


def _probe_body(x_ptr, n):
    for i in range(0, n):
        tl.store(x_ptr + i, i + 1)


@functools.lru_cache(maxsize=None)
def _interpreter_runs_runtime_loops() -> bool:
    """False where Triton's interpreter cannot loop up to a runtime bound: triton <= 3.6 with
    numpy >= 2.4 calls ``int()`` on a one-element array there (triton-lang/triton#9171, fixed in
    later releases; seen on a GPU machine with triton 3.6.0 and numpy 2.5). Every kernel here
    has such loops. Any other failure of the probe is raised."""
    kernel = triton.jit(_probe_body)  # decorated now, under TRITON_INTERPRET=1
    x = torch.zeros(3, dtype=torch.int32)
    try:
        kernel[(1,)](x, 3)
    except Exception as e:  # noqa: BLE001 - only the known interpreter bug is tolerated
        if 'only 0-dimensional arrays' in repr(e):
            return False
        raise
    return x.tolist() == [1, 2, 3]


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    assert nt.interpreting()
    if not _interpreter_runs_runtime_loops():
        pytest.skip(f'triton {triton.__version__} interpreter with numpy {np.__version__} '
                    'cannot loop over a runtime bound (triton-lang/triton#9171); '
                    'the compiled kernels are tested on CUDA')


def _inputs(B, G, D, H, W, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    attn = torch.randn(B, G, k * k, H, W, generator=g).softmax(2)
    value = torch.randn(B, G, D, H, W, generator=g)
    grad_out = torch.randn(B, G, D, H, W, generator=g)
    return attn, value, grad_out


def _reference(attn, value, grad_out, k):
    """Forward and both gradients of the F.unfold formulation, in float64."""
    a = attn.double().requires_grad_()
    v = value.double().requires_grad_()
    out = na2d_av_reference(a, v, k)
    out.backward(grad_out.double())
    return out.detach(), a.grad, v.grad


def _max_err(x, y):
    return (x.double() - y.double()).abs().max().item()


@pytest.mark.parametrize('k,H,W,D,B,G,tiles', CASES)
def test_forward_and_gradients_match_reference(interpreter, monkeypatch, k, H, W, D, B, G,
                                               tiles):
    _set_tiles(monkeypatch, *(tiles or ()))
    attn, value, grad_out = _inputs(B, G, D, H, W, k)
    ref_out, ref_ga, ref_gv = _reference(attn, value, grad_out, k)
    a, v = attn.clone().requires_grad_(), value.clone().requires_grad_()
    out = nt.na2d_av_triton(a, v, k)
    out.backward(grad_out)
    assert out.dtype == torch.float32
    assert _max_err(out, ref_out) < TOL
    assert _max_err(a.grad, ref_ga) < TOL
    assert _max_err(v.grad, ref_gv) < TOL


def test_channel_chunks(interpreter, monkeypatch):
    """D above the forward / grad_value channel tile: two chunks on the grid's second axis, the
    second one masked; grad_attn takes all D channels in one product (padded to 16, masked)."""
    _set_tiles(monkeypatch, block_d=8)
    k = 5
    attn, value, grad_out = _inputs(1, 2, 10, 5, 7, k, seed=1)
    ref_out, ref_ga, ref_gv = _reference(attn, value, grad_out, k)
    assert _max_err(nt.forward(attn, value, k), ref_out) < TOL
    assert _max_err(nt.grad_attn(grad_out, value, k), ref_ga) < TOL
    assert _max_err(nt.grad_value(grad_out, attn, k), ref_gv) < TOL


@pytest.mark.parametrize('k', [1, 3, 5, 7, 13])
def test_inverse_range_formula(k):
    """The grad_value kernel's inverse-neighbourhood range and trip-count bound, against a scan
    of every window on every axis length from k to 3k (pure Python, no kernel)."""
    r = k // 2
    for length in range(k, 3 * k + 1):
        starts = [min(max(i - r, 0), length - k) for i in range(length)]
        longest = 0
        for p in range(length):
            readers = [i for i, s in enumerate(starts) if s <= p < s + k]
            assert nt.inverse_range(p, length, k) == (readers[0], readers[-1]), (k, length, p)
            assert readers == list(range(readers[0], readers[-1] + 1))  # contiguous
            if k <= p < length - k:  # the kernel's "interior": exactly k readers
                assert len(readers) == k
            longest = max(longest, len(readers))
        assert nt.max_inverse_range(length, k) == longest, (k, length)


def test_brute_force_cross_check(interpreter, monkeypatch):
    """One border-heavy case against the loop-per-pixel reference of test_ops_na2d."""
    from test_ops_na2d import brute_force_av, from_ours, make, to_ours
    k = 5
    attn_nat, v_nat = make(2, 1, 8, 6, 5, k, dtype=torch.float32)
    expected = brute_force_av(attn_nat.double(), v_nat.double(), k)
    a, v = to_ours(attn_nat, v_nat)
    out = from_ours(nt.na2d_av_triton(a, v, k))  # non-contiguous permuted views on purpose
    assert _max_err(out, expected) < TOL


#: one unit in the last place, relative: 2**-mantissa_bits. The interpreter converts float32 to
#: bfloat16 by truncation (compiled Triton rounds to nearest), so allow a whole ulp, not half.
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _assert_close_low_precision(x, ref, dtype):
    """Elementwise within one ulp of ``dtype`` (plus float32 accumulation noise near zero)."""
    torch.testing.assert_close(x.double(), ref.double(), rtol=ULP[dtype], atol=1e-4)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_autocast_low_precision(interpreter, monkeypatch, dtype):
    """Under autocast the kernels read fp16/bf16, accumulate in fp32 and return the autocast
    dtype; leaf gradients come back in float32 (the interpreter emulates both dtypes)."""
    k = 5
    attn, value, grad_out = _inputs(1, 2, 8, 7, 9, k, seed=2)
    # reference from the rounded operands: what is left is accumulation and output rounding
    ref_out, ref_ga, ref_gv = _reference(attn.to(dtype), value.to(dtype), grad_out.to(dtype), k)
    a, v = attn.clone().requires_grad_(), value.clone().requires_grad_()
    with torch.autocast('cpu', dtype=dtype):
        out = nt.na2d_av_triton(a, v, k)
    assert out.dtype == dtype
    _assert_close_low_precision(out, ref_out, dtype)
    out.backward(grad_out.to(dtype))
    assert a.grad.dtype == torch.float32 and v.grad.dtype == torch.float32
    _assert_close_low_precision(a.grad, ref_ga, dtype)
    _assert_close_low_precision(v.grad, ref_gv, dtype)


def test_saves_only_attn_and_value(interpreter, monkeypatch):
    k = 5
    attn, value, _ = _inputs(1, 2, 8, 6, 7, k)
    a, v = attn.requires_grad_(), value.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nt.na2d_av_triton(a, v, k)
    assert sum(saved) <= a.numel() + v.numel(), saved


def test_torch_compile_traces_the_kernels_as_custom_ops(interpreter):
    """One graph (fullgraph) whose launches are the overlock_mm::na2d_triton_* custom ops; the
    traced forward and backward equal the reference at a border-heavy map (H == k)."""
    k = 5
    attn, value, grad_out = _inputs(1, 2, 8, 5, 9, k)
    a, v = attn.clone().requires_grad_(), value.clone().requires_grad_()
    fn = torch.compile(lambda x, y: nt.na2d_av_triton(x, y, k), backend='aot_eager',
                       fullgraph=True)
    out = fn(a, v)
    out.backward(grad_out)
    ref_out, ref_ga, ref_gv = _reference(attn, value, grad_out, k)
    assert _max_err(out, ref_out) < TOL
    assert _max_err(a.grad, ref_ga) < TOL and _max_err(v.grad, ref_gv) < TOL


def test_tiles_file_overrides_defaults(interpreter, monkeypatch, tmp_path):
    """OVERLOCK_TRITON_TILES: a subset overrides TILES, the kernels run with it (a tile wider than
    the map), and a typo or a non-power-of-two is refused with the file's name."""
    import json
    path = tmp_path / 'tiles.json'
    path.write_text(json.dumps({'forward': {'BLOCK_J': 64},
                                'grad_value': {'BLOCK_Q': 2, 'num_stages': 3}}))
    monkeypatch.setenv(nt.TILES_ENV, str(path))
    assert nt.tiles('forward')['BLOCK_J'] == 64
    assert nt.tiles('forward')['BLOCK_D'] == nt.TILES['forward']['BLOCK_D']
    assert nt.tiles('grad_value')['BLOCK_Q'] == 2
    assert nt.tiles('grad_value')['num_stages'] == 3  # any positive integer, not only 2**n
    k = 5
    attn, value, grad_out = _inputs(1, 1, 3, 6, 9, k, seed=3)
    ref_out, _, ref_gv = _reference(attn, value, grad_out, k)
    assert _max_err(nt.forward(attn, value, k), ref_out) < TOL
    assert _max_err(nt.grad_value(grad_out, attn, k), ref_gv) < TOL
    for bad, match in (({'forwad': {}}, "unknown Triton kernel 'forwad'"),
                       ({'forward': {'BLOCK_P': 64}}, "unknown tile 'BLOCK_P'"),
                       ({'forward': {'BLOCK_J': 48}}, 'power of two'),
                       ({'grad_value': {'num_stages': 0}}, 'positive integer')):
        bad_path = tmp_path / f'bad{len(match)}.json'
        bad_path.write_text(json.dumps(bad))
        monkeypatch.setenv(nt.TILES_ENV, str(bad_path))
        with pytest.raises(ValueError, match=match) as info:
            nt.tiles('forward')
        assert str(bad_path) in str(info.value)
    monkeypatch.setenv(nt.TILES_ENV, str(tmp_path / 'missing.json'))
    with pytest.raises(ValueError, match='cannot read Triton tiles'):
        nt.tiles('forward')


@pytest.mark.parametrize('k', [3, 5, 7, 9, 13, 17, 21])
def test_band_window_holds_every_tap(k):
    """The forward's column tile: its window holds every tap of every column, is a power of two
    no shorter than MIN_DOT_K, and is the next_pow2(2k) columns the docstring promises."""
    for max_j in (4, 16, 64):
        j, q = nt.band(k, max_j)
        assert j <= max_j and j & (j - 1) == 0 and q & (q - 1) == 0
        assert q >= j + k - 1 and q >= nt.MIN_DOT_K
        if max_j >= 64:  # not capped: the window is next_pow2(2k) and a larger tile misses it
            assert q == max(nt.MIN_DOT_K, triton.next_power_of_2(2 * k))
            assert 2 * j + k - 1 > q


def test_alignment_rule():
    """The forward's vector width: the largest of 4 / 2 / 1 floats dividing the row length and
    every address, whose rounded-down window start still fits the band's power-of-two window."""
    x = torch.zeros(64)

    def align(k, width, *tensors):  # at the forward's default 8 columns and band() window
        return nt.alignment(k, *nt.band(k, 8), width, *tensors)

    assert align(13, 84, x) == 4  # 8 + 12 + 3 = 23 columns fit 32
    assert align(5, 84, x) == 4  # 15 fit 16
    assert align(7, 84, x) == 2  # 8 + 6 + 3 = 17 would need 32 columns; 15 fit 16
    assert align(13, 42, x) == 2  # rows of 42 start on even elements only
    assert align(13, 45, x) == 1
    assert align(13, 84, x, x[1:]) == 1  # one tensor starts one float off
    assert align(13, 84, x[2:]) == 2
    assert align(13, 84, x.half()[2:]) == 2  # alignment counts elements, not bytes


@pytest.mark.parametrize('offset', [1, 2])
def test_forward_on_misaligned_tensors(interpreter, offset):
    """Tensors starting 1 or 2 floats past an aligned address (views into a larger buffer) take
    narrower vectors and the same result; W = 40 would otherwise use 4."""
    k, B, G, D, H, W = 5, 1, 2, 8, 6, 40
    attn, value, _ = _inputs(B, G, D, H, W, k, seed=3)
    ref = na2d_av_reference(attn.double(), value.double(), k)
    a = torch.cat([torch.zeros(offset), attn.flatten()])[offset:].view_as(attn)
    v = torch.cat([torch.zeros(offset), value.flatten()])[offset:].view_as(value)
    assert a.is_contiguous()
    assert nt.alignment(k, *nt.band(k, 8), W, a, v) == (1 if offset == 1 else 2)
    assert _max_err(nt.forward(a, v, k), ref) < TOL


def test_float64_goes_to_native(interpreter):
    """tl.dot has no float64 path: float64 inputs take 'native' and never reach a kernel."""
    attn, value, _ = _inputs(1, 2, 4, 5, 6, 3)
    attn, value = attn.double(), value.double()
    with pytest.raises(TypeError, match='support'):
        nt.forward(attn, value, 3)
    torch.testing.assert_close(nt.na2d_av_triton(attn, value, 3),
                               na2d_av_reference(attn, value, 3))


def test_raw_kernels_require_contiguous_inputs(interpreter):
    attn, value, _ = _inputs(1, 2, 8, 5, 5, 3)
    with pytest.raises(ValueError, match='contiguous'):
        nt.forward(attn, value.transpose(-1, -2), 3)


def test_cpu_without_interpreter_falls_back_to_native(monkeypatch):
    """Plain CPU tensors never reach a compiled kernel (there is no GPU to compile for)."""
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    assert not nt.interpreting()

    def no_kernels():
        raise AssertionError('a Triton kernel was requested for CPU tensors')

    monkeypatch.setattr(nt, '_kernels', no_kernels)
    attn, value, _ = _inputs(1, 2, 4, 5, 6, 3)
    torch.testing.assert_close(nt.na2d_av_triton(attn, value, 3),
                               na2d_av_reference(attn, value, 3))


def test_registered_only_where_it_can_run():
    """'triton' is listed (and preferred by auto on CUDA) only when a CUDA device is present,
    so the CPU-parametrised tests of test_ops_na2d never pick it up."""
    registered = 'triton' in available_impls()
    assert registered == torch.cuda.is_available()
    if registered:
        assert neighborhood._AUTO_ORDER['cuda'][0] == 'triton'
    assert 'triton' not in neighborhood._AUTO_ORDER.get('cpu', [])


@pytest.mark.parametrize('triton_importable', [True, False])
def test_registration_logic_with_cuda_faked(monkeypatch, triton_importable):
    """With a (faked) CUDA device 'triton' registers itself first for 'cuda' -- unless triton
    cannot be imported, in which case nothing changes and nothing raises. Starts from the
    registry without 'triton' (on a real GPU machine it was registered at import)."""
    import sys
    impls = {name: impl for name, impl in neighborhood._IMPLS.items() if name != 'triton'}
    monkeypatch.setattr(neighborhood, '_IMPLS', impls)
    order = {dev: list(o) for dev, o in neighborhood._AUTO_ORDER.items()}
    order['cuda'] = ['native']
    monkeypatch.setattr(neighborhood, '_AUTO_ORDER', order)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    if not triton_importable:
        monkeypatch.setitem(sys.modules, 'triton', None)  # makes find_spec / import fail
    assert neighborhood._register_triton() is triton_importable
    assert ('triton' in neighborhood.available_impls()) is triton_importable
    assert neighborhood._AUTO_ORDER['cuda'][0] == ('triton' if triton_importable else 'native')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device (compiled kernels)')
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_compiled_kernels(monkeypatch, dtype):
    """On a GPU machine: the compiled kernels through na2d_av(impl='auto'), real model sizes."""
    from overlock_mm.ops import na2d_av
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    for k, H, W, D in [(13, 25, 42, 16), (7, 14, 14, 10), (17, 17, 30, 14), (3, 5, 9, 3)]:
        attn, value, grad_out = (t.to(dtype) for t in _inputs(2, 4, D, H, W, k))
        ref = _reference(attn, value, grad_out, k)
        a, v = attn.cuda().requires_grad_(), value.cuda().requires_grad_()
        out = na2d_av(a, v, k)
        assert out.dtype == dtype
        out.backward(grad_out.cuda())
        for got, expected in zip((out, a.grad, v.grad), ref):
            if dtype == torch.float32:
                assert _max_err(got.cpu(), expected) < TOL
            else:
                _assert_close_low_precision(got.cpu(), expected, dtype)
