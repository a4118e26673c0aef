"""The ``'cpu'`` implementation of :func:`overlock_mm.ops.na2d_av`: a C++ kernel
(``csrc/na2d_cpu.cpp``). The same library holds the depthwise-convolution kernels that
:mod:`overlock_mm.ops.dwconv` uses on CPU: the 3x3 convolution, any dilation
(``csrc/dwconv3x3_cpu.cpp``, :func:`dw3x3_forward`), and any other kernel size's forward and
weight gradient (``csrc/dwconv_kxk_cpu.cpp``, :func:`dw_forward`, :func:`dw_grad_weight`); and
BatchNorm's training forward and backward that :mod:`overlock_mm.ops.batchnorm` uses
(``csrc/batchnorm_cpu.cpp``, :func:`bn_forward`, :func:`bn_backward`).

The kernel is plain C++17 without torch headers: it compiles once (~20 s on a 2-core Xeon, then
cached) with the system compiler (``$CXX`` or ``g++``, ``-O3 -march=native``) and is called
through :mod:`ctypes`, which releases the GIL. The forward vectorises over channels (a
channels-last copy of each group's ``value`` is made inside the kernel), the gradients along
``W``; see the comments in the source. The shared library is cached under
``$OVERLOCK_MM_CACHE`` (default ``~/.cache/overlock_mm``), keyed by the source, the flags, the
compiler version and the CPU's instruction-set flags, so a cache shared between different
machines never serves a binary built for another CPU. Builds write to a temporary file and are
renamed into place, so concurrent processes (pytest-xdist, several trainers) are safe.

If no compiler is available or the build fails, the implementation warns once and runs
``'native'`` instead; ``OVERLOCK_MM_NO_CPU_EXT=1`` disables the kernel on purpose.

``attn`` is read in either layout of :mod:`~overlock_mm.ops.neighborhood`: contiguous, or
pixel-major without a copy (then ``grad_attn`` comes back pixel-major too). Pixel-major is the
faster one -- a block of pixels finds its taps in one run of memory, which the kernel prefetches
as such, instead of ``k*k`` planes a map apart -- so :func:`~overlock_mm.ops.prefers_pixel_major`
asks ContMix for it on the CPU.

State kept for backward: ``attn`` and ``value`` only, like ``'native'``. Backward allocates its
two outputs plus O(value)-sized padded copies of ``value`` / ``grad_out`` (no ``k*k``-fold
neighbourhood tensor). float32 and float64 run natively; float16 / bfloat16 (autocast) are
computed in float32 and the output is cast back.
"""
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch

from .neighborhood import (_as_operand, _compute_dtype, _na2d_av_native, apply_lean,
                           is_pixel_major, lean_av_function)

SOURCE = Path(__file__).parent / 'csrc' / 'na2d_cpu.cpp'
# the same library's other kernels: depthwise convolutions (ops/dwconv.py: 3x3, and any K x K)
# and BatchNorm in training (ops/batchnorm.py)
EXTRA_SOURCES = (SOURCE.parent / 'dwconv3x3_cpu.cpp', SOURCE.parent / 'dwconv_kxk_cpu.cpp',
                 SOURCE.parent / 'batchnorm_cpu.cpp')
# every file the build reads: its bytes are part of the cache key
SOURCES = (SOURCE, *EXTRA_SOURCES, SOURCE.parent / 'thread_pool.h', SOURCE.parent / 'vec_f32.h')
# Tried in order.  Loops and functions aligned to 64 bytes: otherwise where the hot loops land
# depends on the code before them, and an unrelated change (the forward's masked loads) left
# grad_value 1.35x slower at k = 7 (A/B on the 2-core VM; aligned, the two run equally fast).
_FLAG_SETS = (
    ['-O3', '-march=native', '-mprefer-vector-width=512', '-falign-functions=64',
     '-falign-loops=64'],
    ['-O3', '-march=native', '-mprefer-vector-width=512'],
    ['-O3', '-march=native'],
    ['-O3'],
)
_COMMON = ['-std=c++17', '-shared', '-fPIC', '-pthread']
_lock = threading.Lock()
_state = {'lib': None, 'tried': False, 'error': None}

_i64, _int, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
# (..., k, [row stride,] pixel_major, threads)
_SIGS = {
    'forward': [_ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _int, _int, _int],
    'grad_attn': [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _int, _i64, _int, _int],
    'grad_value': [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _int, _i64, _int, _int],
}
_SUFFIX = {torch.float32: 'f32', torch.float64: 'f64'}
# csrc/dwconv3x3_cpu.cpp: (x, w, b, out | x, grad_out, grad_w), N, C, H, W, dilation,
# [residual,] threads
_DW3X3_SIGS = {
    'forward': [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _int, _int],
    'grad_weight': [_ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _int],
}
# csrc/dwconv_kxk_cpu.cpp: (x, w, b, out | x, grad_out, grad_w), N, C, H, W, Ho, Wo, kh, kw,
# ph, pw, dh, dw, threads
_DW_KXK_SIGS = {
    'forward': [_ptr, _ptr, _ptr, _ptr] + [_i64] * 12 + [_int],
    'grad_weight': [_ptr, _ptr, _ptr] + [_i64] * 12 + [_int],
}

# csrc/batchnorm_cpu.cpp: (x, w, b, y, mean, var, invstd), N, C, HW, eps, threads |
# (grad_out, x, w, mean, invstd, grad_x, grad_w, grad_b), N, C, HW, threads
_BN_SIGS = {
    'forward': [_ptr] * 7 + [_i64] * 3 + [ctypes.c_double, _int],
    'backward': [_ptr] * 8 + [_i64] * 3 + [_int],
}


def cache_dir() -> Path:
    root = os.environ.get('OVERLOCK_MM_CACHE')
    if root:
        return Path(root)
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(base) / 'overlock_mm'


def _cpu_flags() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith(('flags', 'Features')):
                    return line.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler_id(cxx: str) -> str:
    try:
        return subprocess.run([cxx, '--version'], capture_output=True, text=True,
                              timeout=60).stdout.splitlines()[0]
    except Exception:  # noqa: BLE001 - any failure just means "unknown compiler"
        return cxx


def _compile(cxx: str, flags, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + '.', suffix='.tmp.so', dir=out.parent)
    os.close(fd)
    try:
        cmd = [cxx, *flags, *_COMMON, str(SOURCE), *map(str, EXTRA_SOURCES), '-o', tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f'{" ".join(cmd)} failed:\n{proc.stderr[-2000:]}')
        os.replace(tmp, out)  # atomic: concurrent builders all end with a complete file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build(verbose: bool = False) -> ctypes.CDLL:
    """Compile (or fetch from the cache) and load the kernel library; raises on failure."""
    cxx = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
    if not cxx:
        raise RuntimeError('no C++ compiler found (set CXX or install g++)')
    source = b'\0'.join(p.read_bytes() for p in SOURCES)
    compiler = _compiler_id(cxx)
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b'\0'.join([source, ' '.join(flags + _COMMON).encode(),
                                         compiler.encode(), _cpu_flags().encode(),
                                         platform.machine().encode()])).hexdigest()[:20]
        path = cache_dir() / f'na2d_cpu_{key}.so'
        try:
            if not path.exists():
                if verbose:
                    print(f'[overlock_mm] compiling {SOURCE.name} -> {path}')
                _compile(cxx, flags, path)
            lib = ctypes.CDLL(str(path))
            for suffix in _SUFFIX.values():
                for name, sig in _SIGS.items():
                    fn = getattr(lib, f'na2d_{name}_{suffix}')
                    fn.argtypes, fn.restype = sig, None
                getattr(lib, f'na2d_lanes_{suffix}').restype = ctypes.c_int
            lib.na2d_grad_value_gathers.argtypes = [_i64, _int, _int]
            lib.na2d_grad_value_gathers.restype = ctypes.c_int
            for name, sig in _DW3X3_SIGS.items():
                fn = getattr(lib, f'dw3x3_{name}_f32')
                fn.argtypes, fn.restype = sig, None
            for name, sig in _DW_KXK_SIGS.items():
                fn = getattr(lib, f'dw_{name}_f32')
                fn.argtypes, fn.restype = sig, None
            for name, sig in _BN_SIGS.items():
                fn = getattr(lib, f'bn_{name}_f32')
                fn.argtypes, fn.restype = sig, None
            return lib
        except Exception as e:  # noqa: BLE001 - try the next, more portable flag set
            errors.append(f'{" ".join(flags)}: {e}')
    raise RuntimeError('could not build the na2d CPU kernel:\n' + '\n'.join(errors))


def load() -> Optional[ctypes.CDLL]:
    """The kernel library, or None (after one warning) when it cannot be built."""
    if _state['tried']:
        return _state['lib']
    with _lock:
        if not _state['tried']:
            if os.environ.get('OVERLOCK_MM_NO_CPU_EXT', '0') not in ('', '0'):
                _state['error'] = 'disabled by OVERLOCK_MM_NO_CPU_EXT'
            else:
                try:
                    _state['lib'] = build()
                except Exception as e:  # noqa: BLE001
                    _state['error'] = str(e)
                    warnings.warn(f"overlock_mm: the C++ CPU kernels are unavailable: ContMix "
                                  f"uses 'native' instead and depthwise 3x3 convolutions "
                                  f"PyTorch's ({e})")
            _state['tried'] = True
    return _state['lib']


def build_error() -> Optional[str]:
    """Why the kernel is not in use (build failure or ``OVERLOCK_MM_NO_CPU_EXT``), else None."""
    load()
    return _state['error']


def is_available() -> bool:
    return load() is not None


def usable_eagerly() -> bool:
    """The depthwise and BatchNorm kernels can run for this call: the library built, and no
    tracer or compiler looking (they see aten operations only; ContMix's kernel has custom ops
    for them instead)."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return is_available()


def _dims(value: torch.Tensor):
    b, g, d, h, w = value.shape
    return b * g, d, h, w


def _lib() -> ctypes.CDLL:
    """The kernel library for a raw call. :func:`na2d_av_cpu` only routes calls here when it
    loaded, except inside a ``torch.compile`` trace, which cannot build it: there the first
    call, at run time, builds it, and a failed build ends the run."""
    lib = load()
    if lib is None:
        raise RuntimeError(f"overlock_mm: the 'cpu' na2d kernel is unavailable "
                           f"({_state['error']}); under torch.compile set the backbone's "
                           f"contmix_impl='native', or install a C++ compiler.")
    return lib


def _attn_layout(attn: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """``(attn, 1)`` where ``attn`` is pixel-major (:func:`~overlock_mm.ops.is_pixel_major`),
    else ``(contiguous attn, 0)``: the two layouts the kernel reads."""
    if is_pixel_major(attn):
        return attn, 1
    return attn.contiguous(), 0


def forward(attn: torch.Tensor, value: torch.Tensor, k: int) -> torch.Tensor:
    """Raw forward on float32/float64 CPU tensors (no autograd): ``value`` contiguous, ``attn``
    read in place where it is contiguous or pixel-major (else made contiguous)."""
    lib = _lib()
    suf = _SUFFIX[value.dtype]
    bg, d, h, w = _dims(value)
    out = torch.empty_like(value)
    attn, pm = _attn_layout(attn)
    fn = getattr(lib, f'na2d_forward_{suf}')
    fn(attn.data_ptr(), value.data_ptr(), out.data_ptr(), bg, d, h, w, k, pm,
       torch.get_num_threads())
    return out


def _grad_attn(grad_out: torch.Tensor, value: torch.Tensor, k: int, pm: int) -> torch.Tensor:
    lib = _lib()
    suf = _SUFFIX[value.dtype]
    lanes = getattr(lib, f'na2d_lanes_{suf}')()
    b, g, d, h, w = value.shape
    gattn = (value.new_empty((b, g, h, w, k * k)).permute(0, 1, 4, 2, 3) if pm
             else value.new_empty((b, g, k * k, h, w)))
    # scratch for the kernel's row-padded copy of value (every row one vector longer, so that a
    # tile's whole-vector loads never leave it), filled by the kernel where it reads it
    vp = value.new_empty((b, g, d, h, w + lanes))
    fn = getattr(lib, f'na2d_grad_attn_{suf}')
    fn(grad_out.data_ptr(), value.data_ptr(), vp.data_ptr(), gattn.data_ptr(), b * g, d, h, w, k,
       w + lanes, pm, torch.get_num_threads())
    return gattn


def grad_attn(grad_out: torch.Tensor, value: torch.Tensor, k: int) -> torch.Tensor:
    """``grad_attn``, contiguous (for a contiguous ``attn``)."""
    return _grad_attn(grad_out, value, k, 0)


def grad_attn_pixel_major(grad_out: torch.Tensor, value: torch.Tensor, k: int) -> torch.Tensor:
    """``grad_attn``, pixel-major (for a pixel-major ``attn``)."""
    return _grad_attn(grad_out, value, k, 1)


def grad_value(grad_out: torch.Tensor, attn: torch.Tensor, k: int) -> torch.Tensor:
    lib = _lib()
    suf = _SUFFIX[grad_out.dtype]
    lanes = getattr(lib, f'na2d_lanes_{suf}')()
    b, g, d, h, w = grad_out.shape
    r = k // 2
    wg = w + lanes + 2 * r
    attn, pm = _attn_layout(attn)
    gpad = None  # the pixel-major scatter reads grad_out itself
    if lib.na2d_grad_value_gathers(w, k, pm):
        # grad_out of the interior columns, stored at column j + r, zero elsewhere.
        gpad = grad_out.new_zeros((b, g, d, h, wg))
        gpad[..., 2 * r:w] = grad_out[..., r:w - r]
    gvalue = torch.empty_like(grad_out)
    fn = getattr(lib, f'na2d_grad_value_{suf}')
    fn(attn.data_ptr(), grad_out.data_ptr(), None if gpad is None else gpad.data_ptr(),
       gvalue.data_ptr(), b * g, d, h, w, k, wg, pm, torch.get_num_threads())
    return gvalue


# Save ``attn`` and ``value`` only; both gradients come from the C++ kernel. One function per
# layout of ``attn``, whose gradient has the same layout (what the softmax before it reads).
_CpuNeighborhoodAV = lean_av_function('_CpuNeighborhoodAV', forward, grad_attn, grad_value,
                                      op_prefix='na2d_cpu')
_CpuNeighborhoodAVPixels = lean_av_function(
    '_CpuNeighborhoodAVPixels', forward, grad_attn_pixel_major, grad_value,
    op_prefix='na2d_cpu_pixels', pixel_major=True)


def na2d_av_cpu(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``na2d_av`` through the C++ kernel (falls back to ``'native'`` where it cannot run)."""
    if torch.compiler.is_compiling():
        # a trace cannot run the build (a lock, a compiler process): it takes the kernel unless
        # a build has already failed (the raw calls build it on their first run, see _lib)
        unusable = _state['tried'] and _state['lib'] is None
    else:
        unusable = load() is None
    if value.device.type != 'cpu' or attn.device.type != 'cpu' or unusable:
        return _na2d_av_native(attn, value, kernel_size)
    dtype = _compute_dtype(attn, value)
    work = dtype if dtype in _SUFFIX else torch.float32
    # a pixel-major attn is read as it is (a cast keeps its layout: preserve_format)
    attn = attn if attn.dtype == work else attn.to(work)
    if is_pixel_major(attn):
        function = _CpuNeighborhoodAVPixels
    else:
        function, attn = _CpuNeighborhoodAV, _as_operand(attn, work)
    out = apply_lean(function, attn, _as_operand(value, work), kernel_size)
    return out if out.dtype == dtype else out.to(dtype)


def _ptr_or_none(t: Optional[torch.Tensor]):
    return t.data_ptr() if t is not None else None


# ------------------------------------ depthwise convolutions (csrc/dwconv*_cpu.cpp, ops/dwconv.py)
def dw3x3_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  dilation: int = 1, residual: bool = False) -> torch.Tensor:
    """Depthwise 3x3 convolution, stride 1, dilation = padding = ``dilation``, of an
    NCHW-contiguous float32 ``x`` (``weight`` ``[C, 1, 3, 3]``); plus ``x`` itself if
    ``residual``."""
    lib = _lib()
    n, c, h, w = x.shape
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    lib.dw3x3_forward_f32(x.data_ptr(), weight.data_ptr(),
                          _ptr_or_none(bias), out.data_ptr(),
                          n, c, h, w, dilation, int(residual), torch.get_num_threads())
    return out


def dw3x3_grad_weight(x: torch.Tensor, grad_out: torch.Tensor, dilation: int = 1) -> torch.Tensor:
    """``[C, 1, 3, 3]`` weight gradient of :func:`dw3x3_forward` (both inputs NCHW-contiguous
    float32)."""
    lib = _lib()
    n, c, h, w = x.shape
    gw = x.new_empty((c, 1, 3, 3))
    lib.dw3x3_grad_weight_f32(x.data_ptr(), grad_out.data_ptr(), gw.data_ptr(), n, c, h, w,
                              dilation, torch.get_num_threads())
    return gw


def dw_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               padding: Tuple[int, int], dilation: Tuple[int, int]) -> torch.Tensor:
    """Depthwise convolution, stride 1, of a float32 ``x`` (made NCHW-contiguous here) with
    ``weight`` ``[C, 1, kh, kw]`` (csrc/dwconv_kxk_cpu.cpp); NCHW-contiguous output."""
    lib = _lib()
    x, weight = x.contiguous(), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    n, c, h, w = x.shape
    (kh, kw), (ph, pw), (dh, dw) = weight.shape[-2:], padding, dilation
    ho, wo = h + 2 * ph - dh * (kh - 1), w + 2 * pw - dw * (kw - 1)
    out = x.new_empty((n, c, ho, wo))
    lib.dw_forward_f32(x.data_ptr(), weight.data_ptr(),
                       _ptr_or_none(bias), out.data_ptr(),
                       n, c, h, w, ho, wo, kh, kw, ph, pw, dh, dw, torch.get_num_threads())
    return out


def dw_grad_weight(x: torch.Tensor, grad_out: torch.Tensor, kernel_size: Tuple[int, int],
                   padding: Tuple[int, int], dilation: Tuple[int, int]) -> torch.Tensor:
    """``[C, 1, kh, kw]`` weight gradient of a stride-1 depthwise convolution of ``x`` (float32;
    made NCHW-contiguous here) whose output gradient is ``grad_out``
    (csrc/dwconv_kxk_cpu.cpp)."""
    lib = _lib()
    x, grad_out = x.contiguous(), grad_out.contiguous()
    n, c, h, w = x.shape
    (kh, kw), (ph, pw), (dh, dw) = kernel_size, padding, dilation
    gw = x.new_empty((c, 1, kh, kw))
    lib.dw_grad_weight_f32(x.data_ptr(), grad_out.data_ptr(), gw.data_ptr(), n, c, h, w,
                           grad_out.shape[2], grad_out.shape[3], kh, kw, ph, pw, dh, dw,
                           torch.get_num_threads())
    return gw


# ------------------------------------------------ BatchNorm in training (csrc/batchnorm_cpu.cpp)
def bn_forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm of an NCHW-contiguous float32 ``x`` with its batch statistics: the output, and
    per channel the mean, the biased variance and ``1 / sqrt(var + eps)`` (ops/batchnorm.py)."""
    lib = _lib()
    n, c = x.shape[:2]
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    mean, var, invstd = x.new_empty(c), x.new_empty(c), x.new_empty(c)
    lib.bn_forward_f32(x.data_ptr(), _ptr_or_none(weight), _ptr_or_none(bias), out.data_ptr(),
                       mean.data_ptr(), var.data_ptr(), invstd.data_ptr(), n, c,
                       x[0, 0].numel(), eps, torch.get_num_threads())
    return out, mean, var, invstd


def bn_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                mean: torch.Tensor, invstd: torch.Tensor, needs: Tuple[bool, bool, bool]
                ) -> Tuple[Optional[torch.Tensor], ...]:
    """Gradients of :func:`bn_forward` (input, weight, bias; ``None`` where ``needs`` says
    not), for NCHW-contiguous float32 ``grad_out`` and ``x``."""
    lib = _lib()
    n, c = x.shape[:2]
    weight = weight.contiguous() if weight is not None else None
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if needs[0] else None
    gw = x.new_empty(c) if needs[1] else None
    gb = x.new_empty(c) if needs[2] else None
    lib.bn_backward_f32(grad_out.data_ptr(), x.data_ptr(), _ptr_or_none(weight),
                        mean.data_ptr(), invstd.data_ptr(), _ptr_or_none(gx), _ptr_or_none(gw),
                        _ptr_or_none(gb), n, c, x[0, 0].numel(), torch.get_num_threads())
    return gx, gw, gb
