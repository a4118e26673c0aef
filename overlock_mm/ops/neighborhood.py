"""Neighbourhood aggregation ("AV" step of ContMix) with NATTEN 0.17 ``na2d_av`` semantics.

Semantics (facts from NATTEN 0.17, restated in docs/spec/ARCHITECTURE.md): for a kernel ``k`` with
``r = k // 2`` on an axis of length ``L >= k``, position ``i`` aggregates the window that starts at
``start(i) = clamp(i - r, 0, L - k)``. Windows shift inward at the borders instead of being zero
padded, so every output pixel sees exactly ``k * k`` real neighbours. Tap ``t = a * k + b`` of pixel
``(i, j)`` refers to neighbour ``(start(i) + a, start(j) + b)``.

Layout used throughout this package (channels first, so no permutes are needed around the op):

* ``attn``:  ``[B, G, k*k, H, W]`` -- per-pixel kernel weights, tap-major;
* ``value``: ``[B, G, D, H, W]``   -- a plain ``x.view(B, G, D, H, W)`` of an NCHW tensor;
* output:    ``[B, G, D, H, W]``.

``attn`` may also be *pixel-major*: the same shape as a ``permute(0, 1, 4, 2, 3)`` view of a
contiguous ``[B, G, H, W, k*k]`` tensor (NATTEN's own layout; :func:`is_pixel_major`). Every
implementation accepts it; the ``'cpu'`` kernel reads it without a copy and faster (the taps of
a run of pixels are one run of memory instead of ``k*k`` planes a map apart: the k = 13
detection forward ran 1.2-1.8x faster in A/Bs, docs/performance.md), and returns
``grad_attn`` in the same layout. :func:`prefers_pixel_major` says whether an implementation
wants it, so that whoever makes ``attn`` (ContMix's kernel generation) can write it that way.

Why a custom autograd function: differentiating a gather formulation makes autograd keep the
gathered ``[B, G, D, k*k, H, W]`` neighbourhood tensor alive until backward (k*k times the size of
``value``: 169x at k = 13). :class:`_NeighborhoodAV` saves only ``attn`` and ``value`` and walks the
``k*k`` taps again in backward.

Clamped windows make the tap loop cheap: for a fixed tap row ``a`` the source row of output row
``i`` is ``a`` for ``i < r`` (a broadcast), ``i - r + a`` for ``r <= i < L - r`` (a shifted
slice) and ``L - k + a`` for ``i >= L - r`` (a broadcast). Every tap therefore touches only
views of ``value`` -- no per-tap copies.
"""
import functools
import importlib.util
from functools import lru_cache
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

__all__ = ['na2d_av', 'na2d_av_reference', 'window_start', 'relative_position_index',
           'available_impls', 'known_impls', 'auto_impl', 'register_impl', 'is_pixel_major',
           'prefers_pixel_major']


def _check_inputs(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> None:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f'kernel_size must be a positive odd integer, got {kernel_size}.')
    if attn.dim() != 5 or value.dim() != 5:
        raise ValueError('na2d_av expects attn [B, G, k*k, H, W] and value [B, G, D, H, W]; got '
                         f'attn {tuple(attn.shape)} and value {tuple(value.shape)}.')
    b, g, t, h, w = attn.shape
    if t != kernel_size * kernel_size:
        raise ValueError(f'attn has {t} taps on dim 2 but kernel_size {kernel_size} needs '
                         f'{kernel_size * kernel_size}.')
    if (value.shape[0], value.shape[1], value.shape[3], value.shape[4]) != (b, g, h, w):
        raise ValueError(f'attn {tuple(attn.shape)} and value {tuple(value.shape)} disagree in '
                         'batch, groups or spatial size.')
    if h < kernel_size or w < kernel_size:
        raise ValueError(f'feature map {h}x{w} is smaller than kernel_size {kernel_size}; '
                         'resize it first (OverLoCK does so in DynamicConvBlock).')


def window_start(length: int, kernel_size: int, device=None) -> torch.Tensor:
    """``start(i) = clamp(i - k // 2, 0, L - k)`` for ``i`` in ``range(length)``."""
    i = torch.arange(length, device=device)
    return (i - kernel_size // 2).clamp(0, length - kernel_size)


def relative_position_index(length: int, kernel_size: int, device=None) -> torch.Tensor:
    """Index ``[L, k]`` into an rpb axis of size ``2k - 1`` for tap ``a`` of position ``i``.

    It is the relative offset of the neighbour plus ``k - 1``:
    ``start(i) + a - i + k - 1`` (NATTEN's ``p(i) + a``).
    """
    start = window_start(length, kernel_size, device)
    a = torch.arange(kernel_size, device=device)
    i = torch.arange(length, device=device)
    return start[:, None] + a[None, :] - i[:, None] + kernel_size - 1


@lru_cache(maxsize=None)
def _regions(length: int, kernel_size: int) -> List[Tuple[int, int, int, bool]]:
    """Split an axis into (out_start, out_stop, src_offset, broadcast) regions.

    For tap ``a`` the source of region ``(o0, o1, s, bc)`` is ``value[s + a]`` broadcast over the
    region when ``bc``, otherwise the slice ``value[s + a : s + a + (o1 - o0)]``.
    """
    r = kernel_size // 2
    regions = []
    if r > 0:
        regions.append((0, r, 0, True))
    regions.append((r, length - r, 0, False))
    if r > 0:
        regions.append((length - r, length, length - kernel_size, True))
    return regions


def _src(region: Tuple[int, int, int, bool], tap: int) -> slice:
    o0, o1, s, bc = region
    return slice(s + tap, s + tap + (1 if bc else o1 - o0))


def _forward(attn: torch.Tensor, value: torch.Tensor, k: int, acc_dtype) -> torch.Tensor:
    b, g, d, h, w = value.shape
    out = value.new_zeros((b, g, d, h, w), dtype=acc_dtype)
    rows, cols = _regions(h, k), _regions(w, k)
    attn = attn.unsqueeze(2)  # [B, G, 1, T, H, W]: broadcast over channels
    for a in range(k):
        for bb in range(k):
            t = a * k + bb
            for ro in rows:
                for co in cols:
                    out[..., ro[0]:ro[1], co[0]:co[1]].addcmul_(
                        attn[:, :, :, t, ro[0]:ro[1], co[0]:co[1]],
                        value[..., _src(ro, a), _src(co, bb)])
    return out


def _backward(grad_out: torch.Tensor, attn: torch.Tensor, value: torch.Tensor, k: int,
              need_attn: bool, need_value: bool):
    b, g, d, h, w = value.shape
    rows, cols = _regions(h, k), _regions(w, k)
    grad_attn = torch.empty_like(attn) if need_attn else None
    grad_value = torch.zeros_like(value) if need_value else None
    attn5 = attn.unsqueeze(2)
    for a in range(k):
        for bb in range(k):
            t = a * k + bb
            for ro in rows:
                for co in cols:
                    oi, oj = slice(ro[0], ro[1]), slice(co[0], co[1])
                    si, sj = _src(ro, a), _src(co, bb)
                    go = grad_out[..., oi, oj]
                    if need_attn:
                        # d out / d attn[t] = value at the tap's neighbour, summed over channels.
                        torch.sum(go * value[..., si, sj], dim=2, out=grad_attn[:, :, t, oi, oj])
                    if need_value:
                        # The transposed gather: broadcast regions fold into one source row/col.
                        contrib = attn5[:, :, :, t, oi, oj] * go
                        if ro[3]:
                            contrib = contrib.sum(dim=-2, keepdim=True)
                        if co[3]:
                            contrib = contrib.sum(dim=-1, keepdim=True)
                        grad_value[..., si, sj] += contrib
    return grad_attn, grad_value


def _compute_dtype(attn: torch.Tensor, value: torch.Tensor) -> torch.dtype:
    """The dtype both operands are cast to (autocast-aware, like a matmul would be)."""
    device_type = value.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(attn.dtype, value.dtype)


def is_pixel_major(attn: torch.Tensor) -> bool:
    """Whether ``attn`` ``[B, G, k*k, H, W]`` is a ``permute(0, 1, 4, 2, 3)`` view of a
    contiguous ``[B, G, H, W, k*k]`` tensor (and not itself contiguous)."""
    return (attn.dim() == 5 and not attn.is_contiguous()
            and attn.permute(0, 1, 3, 4, 2).is_contiguous())


def _as_operand(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, contiguous: itself where it already is. The kernels' inputs usually
    are, and ``t.to(dtype).contiguous()`` costs ~1 us a call even then, ~1 % of a small stage-4
    forward per operand (2-vCPU AMD EPYC VM)."""
    if t.dtype == dtype and t.is_contiguous():
        return t
    return t.to(dtype).contiguous()


class _NeighborhoodAV(torch.autograd.Function):
    """Memory-lean autograd function: saves ``attn`` and ``value`` only."""

    @staticmethod
    def forward(ctx, attn, value, kernel_size):
        dtype = attn.dtype
        # Low-precision inputs accumulate in float32: k*k (up to 289) products per output.
        acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        out = _forward(attn, value, kernel_size, acc).to(dtype)
        ctx.save_for_backward(attn, value)
        ctx.kernel_size = kernel_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        attn, value = ctx.saved_tensors
        grad_out = grad_out.to(value.dtype).contiguous()
        grad_attn, grad_value = _backward(grad_out, attn, value, ctx.kernel_size,
                                          ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_attn, grad_value, None


#: class names of the autograd functions that compute ``na2d_av`` (``'native'`` and every
#: :func:`lean_av_function`): a jit trace shows each as ``prim::PythonOp.<name>``, and the FLOP
#: counter (utils/complexity.py) gives each the aggregation's handle.
AV_FUNCTION_NAMES: List[str] = ['_NeighborhoodAV']


def traceable_kernel(op_name: str, kernel: Callable, out_shape: Callable,
                     pixel_major: bool = False) -> Callable:
    """``kernel`` (a raw ``(Tensor, Tensor, int) -> Tensor`` launcher: ctypes, Triton), callable
    inside a ``torch.compile`` trace.

    ``torch.compile`` cannot trace into a ctypes call or a Triton launcher's Python (pointer
    checks, tile lookups): each call would split the graph. So the kernel is also registered as
    the custom op ``overlock_mm::<op_name>``, whose output shape, ``out_shape(*args)``, is all
    the tracer needs; traced code calls the op. Eager code calls ``kernel`` directly: going
    through the op's dispatch costs ~10 us a call on the CPU (measured), more than a small
    stage-4 forward's Python path as a whole. ``pixel_major``: the output is a pixel-major
    ``[B, G, k*k, H, W]`` (:func:`is_pixel_major`), and so is the fake one.
    """
    op = torch.library.custom_op(f'overlock_mm::{op_name}', kernel, mutates_args=())

    def fake(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
        shape = out_shape(a, b, k)
        if pixel_major:
            n, g, t, h, w = shape
            return a.new_empty((n, g, h, w, t), dtype=b.dtype).permute(0, 1, 4, 2, 3)
        return a.new_empty(shape, dtype=b.dtype)
    op.register_fake(fake)

    @functools.wraps(kernel)
    def run(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
        return op(a, b, k) if torch.compiler.is_compiling() else kernel(a, b, k)
    return run


def lean_av_function(name: str, forward: Callable, grad_attn: Callable,
                     grad_value: Callable, op_prefix: str, pixel_major: bool = False) -> type:
    """An autograd function for a kernel-backed implementation (``'cpu'``, ``'triton'``).

    It saves ``attn`` and ``value`` only and calls ``forward(attn, value, k)``,
    ``grad_attn(grad_out, value, k)`` and ``grad_value(grad_out, attn, k)``, each made
    :func:`traceable_kernel` as ``overlock_mm::<op_prefix>_forward`` (``_grad_attn``,
    ``_grad_value``). ``name`` becomes the class name, which is what traced graphs (FLOP
    counting) show as ``PythonOp.<name>``; it is added to :data:`AV_FUNCTION_NAMES`. Run it with
    :func:`apply_lean`, which calls the raw ``forward`` (kept as ``kernel_forward``) where
    autograd has nothing to record. ``pixel_major``: ``grad_attn`` returns a pixel-major
    tensor (for a pixel-major ``attn``; the traced op's fake output has its strides).
    """
    forward = traceable_kernel(f'{op_prefix}_forward', forward, lambda a, v, k: v.shape)
    grad_attn = traceable_kernel(
        f'{op_prefix}_grad_attn', grad_attn,
        lambda g, v, k: (v.shape[0], v.shape[1], k * k, v.shape[3], v.shape[4]),
        pixel_major=pixel_major)
    grad_value = traceable_kernel(f'{op_prefix}_grad_value', grad_value,
                                  lambda g, a, k: g.shape)

    def fwd(ctx, attn, value, kernel_size):
        ctx.save_for_backward(attn, value)
        ctx.kernel_size = kernel_size
        return forward(attn, value, kernel_size)

    @torch.autograd.function.once_differentiable
    def bwd(ctx, grad_out):
        attn, value = ctx.saved_tensors
        k = ctx.kernel_size
        grad_out = grad_out.to(value.dtype).contiguous()
        ga = grad_attn(grad_out, value, k) if ctx.needs_input_grad[0] else None
        gv = grad_value(grad_out, attn, k) if ctx.needs_input_grad[1] else None
        return ga, gv, None

    if name not in AV_FUNCTION_NAMES:
        AV_FUNCTION_NAMES.append(name)
    return type(name, (torch.autograd.Function,),
                dict(forward=staticmethod(fwd), backward=staticmethod(bwd),
                     kernel_forward=staticmethod(forward),
                     __doc__=f'{name}: saves attn and value only (lean_av_function).'))


def apply_lean(function: type, attn: torch.Tensor, value: torch.Tensor,
               kernel_size: int) -> torch.Tensor:
    """Run a :func:`lean_av_function` on cast, contiguous inputs.

    Where autograd has nothing to record (no grad mode, or no input requiring grad) its raw
    forward (``kernel_forward``) is called directly: the ``autograd.Function`` machinery costs
    ~50 us a call on the CPU, a tenth of a small stage-4 forward. A trace (FLOP counting) still
    gets the Function's node.
    """
    needs_graph = torch.is_grad_enabled() and (attn.requires_grad or value.requires_grad)
    if not needs_graph and not torch.jit.is_tracing():
        return function.kernel_forward(attn, value, kernel_size)
    # autocast already decided the dtype; inside, everything runs in it
    with torch.autocast(value.device.type, enabled=False):
        return function.apply(attn, value, kernel_size)


def _na2d_av_native(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    dtype = _compute_dtype(attn, value)
    attn, value = _as_operand(attn, dtype), _as_operand(value, dtype)
    # Autocast is applied above; inside the function everything runs in ``dtype``.
    with torch.autocast(value.device.type, enabled=False):
        return _NeighborhoodAV.apply(attn, value, kernel_size)


def na2d_av_reference(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The ``F.unfold`` formulation (the authors' no-natten fallback style).

    It materialises every neighbourhood (``[B, G*D*k*k, H, W]``) and lets autograd keep it for
    backward. Kept as the reference path for benchmarks and ``contmix_impl='reference'``.
    """
    _check_inputs(attn, value, kernel_size)
    b, g, d, h, w = value.shape
    k = kernel_size
    # Sliding windows of the *unpadded* map: one per valid window start.
    windows = F.unfold(value.reshape(b, g * d, h, w), k)  # [B, G*D*k*k, (H-k+1)*(W-k+1)]
    windows = windows.view(b, g * d * k * k, h - k + 1, w - k + 1)
    si = window_start(h, k, value.device)
    sj = window_start(w, k, value.device)
    windows = windows[:, :, si][:, :, :, sj]  # clamp: border pixels reuse the edge window
    windows = windows.view(b, g, d, k * k, h, w)
    dtype = _compute_dtype(attn, value)
    return torch.einsum('bgthw,bgdthw->bgdhw', attn.to(dtype), windows.to(dtype))


#: name -> implementation; every entry has the signature of :func:`na2d_av` without ``impl``.
_IMPLS: Dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = {
    'native': _na2d_av_native,
    'reference': na2d_av_reference,
}
#: the order in which ``impl='auto'`` tries implementations for a device type.
_AUTO_ORDER: Dict[str, List[str]] = {'cpu': ['native'], 'cuda': ['native']}
#: (implementation, device type) -> whether it reads a pixel-major ``attn`` fastest right now;
#: a callable because that can depend on a kernel built at first use (see ``register_impl``)
_PIXEL_MAJOR: Dict[Tuple[str, str], Callable[[], bool]] = {}


def register_impl(name: str, fn: Callable, devices: Tuple[str, ...] = (),
                  first: bool = True, pixel_major: Tuple[str, ...] = (),
                  pixel_major_if: Callable[[], bool] = lambda: True) -> None:
    """Register a faster implementation and (optionally) make ``auto`` prefer it on ``devices``.

    On the device types in ``pixel_major`` it reads a pixel-major ``attn`` fastest
    (:func:`prefers_pixel_major`) whenever ``pixel_major_if()`` is true: an implementation that
    falls back to ``'native'`` (the ``'cpu'`` one without its C++ library) says so there, since
    ``'native'`` reads a contiguous ``attn`` faster.
    """
    _IMPLS[name] = fn
    _PIXEL_MAJOR.update(((name, dev), pixel_major_if) for dev in pixel_major)
    for dev in devices:
        order = _AUTO_ORDER.setdefault(dev, ['native'])
        if name not in order:
            order.insert(0 if first else len(order), name)


def prefers_pixel_major(impl: str, device_type: str) -> bool:
    """Whether ``impl`` (``'auto'`` resolved for ``device_type``) reads a pixel-major ``attn``
    (module docstring) faster than a contiguous one; the producer of ``attn`` decides."""
    if impl == 'auto':
        impl = auto_impl(device_type)
    condition = _PIXEL_MAJOR.get((impl, device_type))
    return condition is not None and bool(condition())


def auto_impl(device_type: str) -> str:
    """The implementation ``impl='auto'`` picks on a device type (``'cpu'``, ``'cuda'``)."""
    return _AUTO_ORDER.get(device_type, ['native'])[0]


def available_impls() -> List[str]:
    """The implementations this machine can run (``impl=`` values besides ``'auto'``)."""
    return sorted(_IMPLS)


#: implementations that register themselves only where they can run ('triton': a CUDA device
#: and an importable triton, see _register_triton)
_DEVICE_BOUND_IMPLS = ('triton',)


def known_impls() -> List[str]:
    """Every name ``impl=`` accepts on some machine: ``'auto'``, :func:`available_impls` and
    those that register only where they can run. A config checked against it may name
    ``'triton'`` on a CPU-only machine (the call then says why it is unavailable), not a typo."""
    return sorted({'auto', *_IMPLS, *_DEVICE_BOUND_IMPLS})


def na2d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: int,
            impl: str = 'auto') -> torch.Tensor:
    """Aggregate ``value`` over clamped ``k x k`` windows with per-pixel weights ``attn``.

    Args:
        attn (Tensor): ``[B, G, k*k, H, W]`` weights (usually softmax-normalised), in any
            layout; pixel-major ones (:func:`is_pixel_major`) are what the ``'cpu'`` kernel
            reads fastest (:func:`prefers_pixel_major`).
        value (Tensor): ``[B, G, D, H, W]`` values; ``H, W >= kernel_size``.
        kernel_size (int): odd window size ``k``.
        impl (str): ``'auto'`` (fastest available for the device), or one of
            :func:`available_impls` -- ``'reference'`` forces the ``F.unfold`` formulation.

    Returns:
        Tensor: ``[B, G, D, H, W]``, in the autocast dtype under autocast, otherwise in the
        promoted dtype of the inputs.
    """
    _check_inputs(attn, value, kernel_size)
    if impl == 'auto':
        impl = auto_impl(value.device.type)
    try:
        fn = _IMPLS[impl]
    except KeyError:
        raise ValueError(f"unknown na2d_av impl '{impl}'; valid: 'auto', "
                         f"{', '.join(repr(k) for k in available_impls())}.") from None
    return fn(attn, value, kernel_size)


def _register_triton() -> bool:
    """Register ``'triton'`` (preferred by ``auto`` on CUDA) where it can run; True if it did.

    Only with a CUDA device *and* an importable ``triton``: elsewhere the name stays out of
    :func:`available_impls`, so CPU-only installs neither pay for importing triton nor list an
    implementation that would only fall back to ``'native'``. A broken triton install is treated
    like a missing one -- ``'native'`` still serves CUDA.
    """
    if not torch.cuda.is_available() or importlib.util.find_spec('triton') is None:
        return False
    try:
        from .na2d_triton import na2d_av_triton
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    register_impl('triton', na2d_av_triton, devices=('cuda',))
    return True


def _register_builtin() -> None:
    from . import na2d_cpu
    # looked up at each call: the library is built (or fails to) at first use
    register_impl('cpu', na2d_cpu.na2d_av_cpu, devices=('cpu',), pixel_major=('cpu',),
                  pixel_major_if=lambda: na2d_cpu.is_available())
    _register_triton()


_register_builtin()
