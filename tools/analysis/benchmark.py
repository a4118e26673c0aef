"""Speed and memory of the ContMix aggregation and of whole OverLoCK backbones.

A benchmark harness, not a test: everything is measured side by side in one run on one device
(CUDA when present, otherwise CPU), printed as tables and optionally written as JSON.

Op level (``--ops``): ``overlock_mm.ops.na2d_av`` (``attn [B, G, k*k, H, W]``,
``value [B, G, D, H, W]``) for every implementation in ``available_impls()`` that runs on the
device (on CUDA with triton installed: ``'triton'``, which ``auto`` then prefers), at the stage-3 /
stage-4 maps (stride 16 / 32) the variants see for 224x224 classification, 1344x800 detection
and 2048x512 segmentation inputs, with the group count ``G = 2 * num_heads``, the channels per
group ``D = dim / (2G)`` and the kernel sizes (small ``smk_size``, large ``kernel_sizes[stage]``)
read from ``OverLoCK.arch_settings`` / ``DynamicConvBlock``. Every case is compared with

* a depthwise ``conv2d`` with the same ``k``, ``G * D`` channels and map (same arithmetic,
  vendor-tuned), and
* the memory roofline: the bytes that must move (forward: attn + value read, out written;
  backward: grad_out + attn + value read, grad_attn + grad_value written) over the copy
  bandwidth sampled during each case (``dst.copy_(src)`` of a 256 MB tensor into a
  preallocated, warmed buffer; read + write bytes counted; median of the samples),
* ``copy``: the same copy moving exactly the op's bytes (forward; forward + backward), timed
  like the op. Its ``%roof`` is what one launch of a bandwidth-bound kernel reaches at this size
  -- far below 100 % for the small maps of a GPU at batch 1, and
* the arithmetic ceiling (not a target): the forward's FLOPs at the rate of a float32
  ``torch.mm`` sampled at the same moments (``GemmRate``), the other side of the roofline model.

Depthwise-conv level (``--dwconv``): every depthwise convolution of the training-mode backbone
(read from the model with forward hooks, with its input size) timed with PyTorch's ``F.conv2d``
and with ``overlock_mm.ops.depthwise_conv2d`` (forward, forward+backward), summed over the
backbone.

Model level (``--models``): inference and training-step throughput and peak memory of the
backbones at classification (224), detection (1344x800, batch 1) and segmentation (512x512)
sizes, with our fast op (``contmix_impl='auto'``) against the ``F.unfold`` formulation
(``contmix_impl='reference'``), re-parameterised (``switch_to_deploy()``) or not (inference),
with and without ``with_cp=True`` (training), and with selective recomputation turned off
(``memory_efficient=False``: what the default's lower memory costs in time). A training step is
forward, ``sum(mean(out))``, backward and an SGD step (no momentum: no optimizer state). Both
sides are the same network (``memory_efficient`` at its default) and differ only in the op.
One step of every configuration is run first for its peak memory, in the meter's allocator mode
(below); then each configuration's timed steps (by default one, on a freshly built model) run
with glibc reusing freed blocks, as in a user's process (see ``run_models``).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated()`` minus the allocation before the
measured call. On CPU the peak resident set size of this process above the level before the
call: the high-water mark ``VmHWM`` of ``/proc/self/status`` is reset (``/proc/self/clear_refs``
= 5) before each measurement and the script re-executes itself with glibc's
``MALLOC_MMAP_THRESHOLD_=65536``, so every freed tensor is returned to the OS and the baseline is
honest; a calibration allocation at start-up checks the meter. Inputs (and, for models, the
parameters) exist before the baseline is taken, so the figure is the working memory of the call.

Usage::

    python tools/analysis/benchmark.py                  # default: ~11 min on a 2-core CPU
    python tools/analysis/benchmark.py --ops --quick    # op level only, fewer repeats (~1 min)
    python tools/analysis/benchmark.py --models --variants t --tasks det --json out.json
    python tools/analysis/benchmark.py --models --modes train --cp-stages 1000 1100
    python tools/analysis/benchmark.py --full --json bench.json   # everything (hours on CPU)
    make benchmark BENCH_ARGS="--threads 1 --json bench.json"

The default run is: op level for OverLoCK-T at all three task sizes (both ContMix kernels, all
implementations), and model level OverLoCK-T detection (1344x800, batch 1) inference
(reference, ours, ours re-parameterised) and training steps (reference, ours, ours +
``with_cp=True``, ours + ``with_cp=(True, False, False, False)``, ours +
``memory_efficient=False``), which the targets need, plus the depthwise-conv level of the OverLoCK-T
detection backbone. ``--full`` runs every variant (xt, t, s, b), task
(cls, det, seg) and combination (reference re-parameterised and checkpointed too); on a CPU it
takes hours and the larger variants' reference training steps need > 20 GB of memory at
detection size. On a machine shared with other jobs, ``--threads 1`` avoids the oversubscription
stalls of two processes each spinning two threads on two cores.
"""
import os
import sys

_MMAP_ENV = 'MALLOC_MMAP_THRESHOLD_'


def _reexec_with_malloc_env() -> None:
    """Restart the interpreter with glibc returning freed blocks >= 64 KiB to the OS.

    Must run before torch is imported; a no-op off Linux or when the variable is already set.
    """
    if (sys.platform.startswith('linux') and _MMAP_ENV not in os.environ
            and '--no-reexec' not in sys.argv):
        os.environ[_MMAP_ENV] = str(1 << 16)
        os.execv(sys.executable, [sys.executable] + sys.argv)


if __name__ == '__main__':
    _reexec_with_malloc_env()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

#: input size (H, W) per task for the op-level maps.
OP_INPUTS: Dict[str, Tuple[int, int]] = {'cls': (224, 224), 'det': (800, 1344), 'seg': (512, 2048)}
#: input size (H, W) per task for the model level (segmentation trains on 512x512 crops).
MODEL_INPUTS: Dict[str, Tuple[int, int]] = {'cls': (224, 224), 'det': (800, 1344),
                                            'seg': (512, 512)}
#: OverLoCK layout per task.
LAYOUT = {'cls': 'cls', 'det': 'det', 'seg': 'seg'}
#: the targets of project issue 5: (key, description, threshold, direction).
TARGETS = (
    ('op_fwd_speedup', 'op forward at detection sizes vs F.unfold reference', 20.0, '>='),
    ('op_fwdbwd_speedup', 'op forward+backward at detection sizes vs reference', 5.0, '>='),
    ('op_mem_ratio', 'op fwd+bwd peak memory / reference (detection sizes)', 0.25, '<='),
    ('op_roofline', 'op forward, fraction of the memory roofline (detection sizes)', 0.5, '>='),
    ('train_time_ratio', 'OverLoCK-T train step 1344x800: time ours / reference', 0.5, '<='),
    ('train_mem_ratio', 'OverLoCK-T train step 1344x800: peak memory ours / reference', 0.5,
     '<='),
    ('train_time_ratio_cp', 'same, ours with with_cp=True: time / reference', 0.5, '<='),
    ('train_mem_ratio_cp', 'same, ours with with_cp=True: peak memory / reference', 0.5, '<='),
)


# ----------------------------------------------------------------------------- measurement
def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (a no-op on CPU)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _proc_status_kb(key: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """Context manager measuring peak memory above the level at entry, in bytes.

    Args:
        device: CUDA uses the caching allocator's statistics; CPU the process' resident set
            (``VmHWM`` reset through ``/proc/self/clear_refs``).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0
        self.peak: Optional[int] = None

    @staticmethod
    def method(device: torch.device) -> str:
        """A one-line description of how peak memory is measured on ``device``."""
        if device.type == 'cuda':
            return 'torch.cuda.max_memory_allocated() - memory_allocated() before the call'
        if PeakMemory.cpu_supported():
            return ('peak RSS: /proc/self/status VmHWM (reset via /proc/self/clear_refs=5) - '
                    f'VmRSS before the call; {_MMAP_ENV}={os.environ.get(_MMAP_ENV, "unset")}')
        return 'unavailable (no /proc/self/clear_refs)'

    @staticmethod
    def cpu_supported() -> bool:
        """Whether the VmHWM reset works on this kernel."""
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')
            _proc_status_kb('VmHWM')
            return True
        except OSError:
            return False

    def __enter__(self) -> 'PeakMemory':
        gc.collect()
        if self.device.type == 'cuda':
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.cpu_supported():
            self.base = _proc_status_kb('VmRSS') * 1024
        else:
            self.base = -1
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == 'cuda':
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.base >= 0:
            self.peak = _proc_status_kb('VmHWM') * 1024 - self.base


def time_it(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int,
            min_time: float = 0., max_repeat: int = 200) -> List[float]:
    """Wall-clock times in seconds of ``fn`` after ``warmup`` untimed calls.

    At least ``repeat`` calls are timed, more (up to ``max_repeat``) while their total is below
    ``min_time`` seconds, so that millisecond-scale medians are not at the mercy of a few
    descheduled calls on a shared machine.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: List[float] = []
    while len(times) < repeat or (sum(times) < min_time and len(times) < max_repeat):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


#: op level: the forward of every implementation but the reference is timed in this many bursts,
#: with copy-bandwidth samples between them (see bench_op_case).
FWD_BURSTS = 3

# glibc mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@contextlib.contextmanager
def malloc_reuse():
    """Within: glibc keeps freed blocks below 32 MiB for reuse, as it does in a training loop.

    The memory meter needs every freed block returned to the OS (``MALLOC_MMAP_THRESHOLD_``
    above), but then every tensor of every call is a fresh ``mmap`` whose pages fault in on first
    touch -- on this VM ~0.7 ms per 2 MB, more than a memory-bound op's own roofline. glibc's
    default (dynamic) threshold rises to the largest freed block up to 32 MiB, so a steady-state
    loop reuses its buffers; timings are taken in that state (consistent with the roofline, whose
    copy goes into a preallocated, warmed buffer), peak memory in a separate call outside it.
    A no-op where the meter's mode is not active (no glibc, or the variable unset).
    """
    libc = None
    if sys.platform.startswith('linux') and _MMAP_ENV in os.environ:
        try:
            import ctypes
            libc = ctypes.CDLL('libc.so.6')
        except OSError:
            libc = None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    try:
        yield
    finally:
        threshold = int(os.environ[_MMAP_ENV])
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold)
        libc.malloc_trim(0)  # hand the blocks kept for reuse back before the next baseline


def measure(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int,
            min_time: float = 0., bursts: int = 1,
            between: Optional[Callable[[], object]] = None
            ) -> Tuple[float, List[float], Optional[int]]:
    """Median time, all times and peak memory of an op-level call ``fn``.

    The calls are timed under :func:`malloc_reuse` (glibc reusing freed blocks, as in any
    process that is not the memory meter) and the peak comes from one more call with the meter's
    allocator mode (the model level orders its steps differently, see :func:`run_models`).
    The calls can be split into ``bursts`` (``repeat`` and ``min_time`` shared among them, one
    more warm-up call each, ``between()`` run between two bursts) whose times are pooled: a
    neighbour on a shared VM that slows the machine for a second then spoils a third of the
    calls, not the median.
    """
    times = []
    with malloc_reuse():  # once for all bursts: leaving it trims the heap
        for i in range(bursts):
            if i and between is not None:
                between()
            times += time_it(fn, device, warmup if i == 0 else min(warmup, 1),
                             math.ceil(repeat / bursts), min_time / bursts)
    with PeakMemory(device) as mem:
        fn()
        synchronize(device)
    return statistics.median(times), times, mem.peak


def graph_time(fns: Sequence[Callable[[], object]], device: torch.device, replays: int = 20
               ) -> Tuple[Optional[float], Optional[str]]:
    """CUDA: GPU seconds per call of ``fns``, without the host's launch overhead.

    The calls are captured once into a CUDA graph (after two warm-up rounds on a side stream,
    which also compiles Triton kernels) and the graph is replayed ``replays`` times between CUDA
    events; the result is the median replay over ``len(fns)``. Give each function its own inputs,
    together larger than the L2 cache (:func:`input_sets`), so that no call finds its operands
    left in the cache by the previous one. Returns ``(None, reason)`` where capture fails (an
    implementation that synchronises, say); the caller then keeps its wall-clock time.
    """
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            for fn in fns:
                fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    synchronize(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for fn in fns:
                fn()
    except Exception as e:  # noqa: BLE001 - any capture failure: fall back to wall time
        synchronize(device)
        return None, f'{type(e).__name__}: {e}'[:200]
    graph.replay()
    synchronize(device)
    times = []
    for _ in range(replays):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(fns))
    del graph
    synchronize(device)
    torch.cuda.empty_cache()
    return statistics.median(times), None


def input_sets(device: torch.device, set_bytes: int, max_sets: int = 64) -> int:
    """How many copies of a call's inputs :func:`graph_time` should rotate through: together at
    least three times the GPU's L2 cache (1 on CPU, where timing uses one set)."""
    if device.type != 'cuda':
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), 'L2_cache_size', 64 << 20)
    return max(1, min(max_sets, math.ceil(3 * l2 / max(set_bytes, 1))))


class CopyBandwidth:
    """Copy bandwidth in bytes/s: ``dst.copy_(src)`` of ``mbytes`` MB, read + write counted.

    The buffers are allocated and the destination warmed once; every :meth:`sample` then times
    copies between them (on CUDA by :func:`graph_time`: no launch overhead, 256 MB is larger
    than any L2 cache). Reusing the buffers keeps a sample at ~0.25 s on the 2-core VM (a fresh
    pair paid ~0.2 s of page faults more).
    """

    def __init__(self, device: torch.device, mbytes: int = 256) -> None:
        self.device = device
        n = mbytes * (1 << 20) // 4
        self.src = torch.empty(n, device=device).fill_(1.0)  # values do not matter
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)

    def release(self) -> None:
        """Free the two buffers (512 MB): later measurements must not see them."""
        self.src = self.dst = None

    def sample(self, repeat: int = 10) -> float:
        t = None
        if self.device.type == 'cuda':
            t, _ = graph_time([lambda: self.dst.copy_(self.src)], self.device, replays=repeat)
        if t is None:
            t = statistics.median(time_it(lambda: self.dst.copy_(self.src), self.device,
                                          warmup=2, repeat=repeat))
        return 2 * self.src.numel() * self.src.element_size() / t


def copy_bandwidth(device: torch.device, mbytes: int = 256, repeat: int = 10) -> float:
    """One :class:`CopyBandwidth` sample with buffers of its own."""
    return CopyBandwidth(device, mbytes).sample(repeat)


class GemmRate:
    """The arithmetic ceiling in FLOP/s: ``torch.mm`` of two square float32 matrices.

    The memory roofline bounds a call by its bytes; this bounds it by its multiply-adds, at the
    rate the vendor's most tuned kernel (BLAS; cuBLAS without TF32) reaches on the same cores in
    the same seconds -- the other side of the roofline model, ``max(bytes / bandwidth, FLOPs /
    rate)``. It matters where a call's arithmetic is heavy for its bytes: the k = 13 forward
    makes 16 multiply-adds per attention weight read, and on the 2-vCPU AMD EPYC VM its FLOPs
    at the GEMM rate (158-194 GFLOP/s with two threads, MKL, in 2026-11-29's runs) take
    1.14-1.21x as long as its bytes at the copy bandwidth. A rate, not the FMA peak: our block
    kernel alone ran 107-112 GFLOP/s a thread there, MKL's GEMM ~96. ``n`` = 512 on the CPU
    (3 MB of operands, cache-resident: ~1.6 ms a call there), 4096 on CUDA (timed by
    :func:`graph_time`).
    """

    def __init__(self, device: torch.device, n: Optional[int] = None) -> None:
        self.device = device
        n = n or (4096 if device.type == 'cuda' else 512)
        gen = torch.Generator(device='cpu').manual_seed(0)
        self.a, self.b = (torch.randn(n, n, generator=gen).to(device) for _ in range(2))
        self.out = torch.empty(n, n, device=device)
        self.flops = 2 * n ** 3

    def release(self) -> None:
        self.a = self.b = self.out = None

    def sample(self, repeat: int = 5) -> float:
        def mm():
            torch.mm(self.a, self.b, out=self.out)

        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 arithmetic, as the op's
        try:
            t = None
            if self.device.type == 'cuda':
                t, _ = graph_time([mm], self.device, replays=repeat)
            if t is None:
                t = statistics.median(time_it(mm, self.device, warmup=1, repeat=repeat))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        return self.flops / t


def calibrate_memory_meter(device: torch.device) -> Optional[float]:
    """Measured / true size of a 200 MB allocation (1.0 means the meter is exact)."""
    size = 200 * (1 << 20)

    def alloc():
        x = torch.ones(size // 4, device=device)
        del x

    with PeakMemory(device) as mem:
        alloc()
    return None if mem.peak is None else mem.peak / size


def _loadavg() -> Optional[Tuple[float, float, float]]:
    """1/5/15-minute load averages (other processes sharing the machine show up here)."""
    return os.getloadavg() if hasattr(os, 'getloadavg') else None


# ----------------------------------------------------------------------------- op level
@dataclass
class OpCase:
    """One ``na2d_av`` call of a real model: variant, task, stage and which ContMix kernel."""

    variant: str
    task: str
    stage: int  # 3 (stride 16) or 4 (stride 32)
    kernel: str  # 'large' or 'small'
    k: int
    batch: int
    groups: int
    head_dim: int
    height: int
    width: int

    @property
    def name(self) -> str:
        return (f'{self.variant}-{self.task}-s{self.stage}-k{self.k} B{self.batch} G{self.groups} '
                f'D{self.head_dim} {self.height}x{self.width}')

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the forward (= those of the depthwise conv)."""
        return self.batch * self.groups * self.head_dim * self.height * self.width * self.k ** 2

    def bytes_moved(self, itemsize: int = 4) -> Tuple[int, int]:
        """(forward, backward) bytes that must cross memory at least once."""
        hw = self.batch * self.groups * self.height * self.width
        attn = hw * self.k * self.k * itemsize
        value = hw * self.head_dim * itemsize
        return attn + 2 * value, 2 * attn + 3 * value


def _stride_size(length: int, stride: int) -> int:
    """Output length after ``log2(stride)`` stride-2 3x3 convs with padding 1 (stem, embeds)."""
    for _ in range(int(math.log2(stride))):
        length = (length - 1) // 2 + 1
    return length


def contmix_geometry(variant: str) -> Dict[int, Dict[str, int]]:
    """Groups, channels per group and kernel sizes of the ContMix calls of stages 3 and 4.

    Derived from ``OverLoCK.arch_settings`` and checked against a constructed
    ``DynamicConvBlock`` (``num_groups``, ``kernel_size``, ``smk_size``).
    """
    from overlock_mm import OverLoCK
    from overlock_mm.layers import DynamicConvBlock
    arch = OverLoCK._parse_arch(variant)
    dims, kernels, heads = arch['embed_dims'], arch['kernel_sizes'], arch['num_heads']
    smk = inspect.signature(OverLoCK).parameters['smk_size'].default
    out = {}
    for s, stage in enumerate((2, 3)):
        block = DynamicConvBlock(dims[stage], dims[3], kernels[stage], smk, heads[s])
        groups = block.num_groups
        # contmix_aggregate: value.view(b, 2, G, C / 2G, h, w) -> one na2d_av per kernel.
        head_dim = dims[stage] // (2 * groups)
        assert groups * head_dim * 2 == dims[stage]
        out[stage + 1] = dict(groups=groups, head_dim=head_dim, large=block.kernel_size,
                              small=block.smk_size)
    return out


def op_cases(variants: Sequence[str], tasks: Sequence[str], kernels: Sequence[str],
             cls_batch: int, dense_batch: int = 1) -> List[OpCase]:
    """The ``na2d_av`` calls each variant makes at each task's input size (batch ``cls_batch``
    for classification, ``dense_batch`` for detection and segmentation)."""
    cases = []
    for variant in variants:
        geo = contmix_geometry(variant)
        for task in tasks:
            ih, iw = OP_INPUTS[task]
            for stage, stride in ((3, 16), (4, 32)):
                h, w = _stride_size(ih, stride), _stride_size(iw, stride)
                g = geo[stage]
                for kernel in kernels:
                    k = g[kernel]
                    # DynamicConvBlock upsamples maps smaller than the large kernel.
                    kl = g['large']
                    hh, ww = h, w
                    if min(h, w) < kl:
                        hh, ww = (kl, int(kl / h * w)) if h < w else (int(kl / w * h), kl)
                    cases.append(OpCase(variant, task, stage, kernel, k,
                                        cls_batch if task == 'cls' else dense_batch, g['groups'],
                                        g['head_dim'], hh, ww))
    return cases


def _dwconv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, weight, padding=weight.shape[-1] // 2, groups=x.shape[1])


def bench_op_case(case: OpCase, impls: Sequence[str], device: torch.device, warmup: int,
                  repeat: int, ref_repeat: int, min_time: float) -> dict:
    """Time and memory of every implementation and the depthwise conv for one case.

    Args:
        case: the call to reproduce.
        impls: ``na2d_av`` implementations to run (the depthwise conv is always added).
        device: where to run.
        warmup: untimed calls before timing.
        repeat: minimum timed calls (``ref_repeat`` for ``'reference'``).
        ref_repeat: timed calls of the slow reference (no ``min_time`` extension, at most one
            warm-up call).
        min_time: keep timing fast calls until their total reaches this many seconds.

    The roofline's copy bandwidth is sampled (:class:`CopyBandwidth`) before the case, between
    the three bursts in which every implementation but the slow reference times its forward, and
    after the case; the median sample is used. On a shared VM one sample scattered over 22-40
    GB/s between back-to-back calls (2-vCPU AMD EPYC VM, 2026-11-28), so a single sample taken
    before the case set every percentage of the case by chance; sampling between the bursts
    measures the bandwidth over the same seconds as the forward. All samples are kept in the
    result (``copy_bandwidth_samples_GBps``). The arithmetic ceiling (:class:`GemmRate`) is
    sampled at the same moments (``gemm_samples_GFLOPs``); the forward's FLOPs at its median
    rate are ``arithmetic_fwd_s``, and each implementation's ``gemm_rate_fwd`` is that time over
    its own.

    Returns:
        dict: case geometry, bytes, roofline times and per-implementation results.
    """
    from overlock_mm.ops import na2d_av, prefers_pixel_major
    b, g, d, h, w, k = case.batch, case.groups, case.head_dim, case.height, case.width, case.k
    gen = torch.Generator(device='cpu').manual_seed(0)
    fwd_bytes, bwd_bytes = case.bytes_moved(4)
    # On CUDA each timed call reads its own copy of the inputs (graph_time); on CPU one set.
    n_sets = input_sets(device, fwd_bytes + bwd_bytes)
    sets = []
    for _ in range(n_sets):
        attn = torch.randn(b, g, k * k, h, w, generator=gen).softmax(dim=2).to(device)
        value = torch.randn(b, g, d, h, w, generator=gen).to(device)
        grad_out = torch.randn(b, g, d, h, w, generator=gen).to(device)
        sets.append((attn, value, grad_out))
    attn, value, grad_out = sets[0]
    result = dict(case=asdict(case), name=case.name, bytes_fwd=fwd_bytes, bytes_bwd=bwd_bytes,
                  macs=case.macs, input_sets=n_sets, impls={})
    copy_meter, gemm_meter = CopyBandwidth(device), GemmRate(device)
    bandwidths, rates = [copy_meter.sample()], [gemm_meter.sample()]

    def sample_bounds() -> None:
        bandwidths.append(copy_meter.sample())
        rates.append(gemm_meter.sample())

    def record(name: str, fwds: List[Callable[[], object]], fwdbwds: List[Callable[[], object]],
               rep: int, mt: float, wu: int = warmup) -> None:
        bursts = 1 if name == 'reference' else FWD_BURSTS
        t_f, ts_f, _ = measure(fwds[0], device, wu, rep, mt, bursts=bursts,
                               between=sample_bounds)
        t_fb, ts_fb, mem = measure(fwdbwds[0], device, wu, rep, mt)
        m = dict(fwd_s=t_f, fwd_times=ts_f, fwdbwd_s=t_fb, fwdbwd_times=ts_fb,
                 fwdbwd_peak_bytes=mem, timing='wall clock per call')
        if device.type == 'cuda':
            # GPU time (graph replays over rotated inputs); the eager per-call wall time, which
            # includes Python and launch overhead, stays in the JSON as *_call_s.
            g_f, err_f = graph_time(fwds, device)
            g_fb, err_fb = graph_time(fwdbwds, device)
            m.update(fwd_call_s=t_f, fwdbwd_call_s=t_fb)
            if g_f is not None and g_fb is not None:
                m.update(fwd_s=g_f, fwdbwd_s=g_fb,
                         timing=f'CUDA graph replay, {len(fwds)} input sets')
            else:
                m['graph_error'] = err_f or err_fb
        result['impls'][name] = m

    with torch.no_grad():
        expected = na2d_av(attn, value, k, impl='reference')
    for impl in impls:
        # each implementation reads the weights in the layout the model hands it: pixel-major
        # where it prefers that (OverLoCK's kernel generation writes it so; same values, same
        # bytes), else contiguous
        pixels = prefers_pixel_major(impl, device.type)
        impl_sets = [(a.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3) if pixels
                      else a, v, gr) for a, v, gr in sets]
        with torch.no_grad():  # a fast but wrong kernel must not go unnoticed
            err = (na2d_av(impl_sets[0][0], value, k, impl=impl) - expected).abs().max().item()
        fwds, fwdbwds = [], []
        for s_attn, s_value, s_grad in impl_sets:
            a = s_attn.clone().requires_grad_()
            v = s_value.clone().requires_grad_()

            def fwd(impl=impl, s_attn=s_attn, s_value=s_value):
                with torch.no_grad():
                    return na2d_av(s_attn, s_value, k, impl=impl)

            def fwdbwd(impl=impl, a=a, v=v, s_grad=s_grad):
                # the gradients die within the call: the peak counts this call's own, and no
                # earlier call's sit in the baseline (freed during the measured call, they made
                # the figure depend on where glibc had put them: 2-30 MB at the k = 13 map)
                na2d_av(a, v, k, impl=impl).backward(s_grad)
                a.grad = v.grad = None

            fwds.append(fwd)
            fwdbwds.append(fwdbwd)
        if impl == 'reference':
            record(impl, fwds, fwdbwds, ref_repeat, 0., min(warmup, 1))  # seconds per call
        else:
            record(impl, fwds, fwdbwds, repeat, min_time)
        result['impls'][impl]['max_abs_err_fwd'] = err
        result['impls'][impl]['attn_layout'] = 'pixel-major' if pixels else 'contiguous'
        del fwds, fwdbwds, impl_sets

    fwds, fwdbwds = [], []
    for s_attn, s_value, s_grad in sets:
        x = s_value.reshape(b, g * d, h, w).clone()
        weight = torch.randn(g * d, 1, k, k, generator=gen).to(device)
        xg, wg = x.clone().requires_grad_(), weight.clone().requires_grad_()

        def conv_fwd(x=x, weight=weight):
            with torch.no_grad():
                return _dwconv(x, weight)

        def conv_fwdbwd(xg=xg, wg=wg, s_grad=s_grad):
            _dwconv(xg, wg).backward(s_grad.reshape(b, g * d, h, w))
            xg.grad = wg.grad = None  # as in fwdbwd above

        fwds.append(conv_fwd)
        fwdbwds.append(conv_fwdbwd)
    record('dwconv', fwds, fwdbwds, repeat, min_time)

    # The attainable bound at this size: the vendor's copy kernel moving exactly the op's bytes
    # (read + write = bytes_fwd, resp. bytes_fwd + bytes_bwd) in one launch. A small transfer
    # does not reach the 256 MB copy's bandwidth (launch, ramp-up and tail of one wave): on an
    # H200 a copy of a batch-1 detection map's forward bytes ran at 28-54 % of the roofline.
    fwds, fwdbwds = [], []
    for _ in sets:
        srcs = [torch.empty(max(1, n // 8), dtype=torch.float32, device=device).fill_(1.0)
                for n in (fwd_bytes, fwd_bytes + bwd_bytes)]
        dsts = [torch.empty_like(t) for t in srcs]
        fwds.append(lambda d=dsts[0], s=srcs[0]: d.copy_(s))
        fwdbwds.append(lambda d=dsts[1], s=srcs[1]: d.copy_(s))
    record('copy', fwds, fwdbwds, repeat, min_time)

    sample_bounds()
    copy_meter.release()
    gemm_meter.release()
    bandwidth, rate = statistics.median(bandwidths), statistics.median(rates)
    result.update(copy_bandwidth_GBps=bandwidth / 1e9,
                  copy_bandwidth_samples_GBps=[bw / 1e9 for bw in bandwidths],
                  roofline_fwd_s=fwd_bytes / bandwidth,
                  roofline_fwdbwd_s=(fwd_bytes + bwd_bytes) / bandwidth,
                  gemm_GFLOPs=rate / 1e9, gemm_samples_GFLOPs=[r / 1e9 for r in rates],
                  # the forward's multiply-adds at the GEMM rate (not a target; see GemmRate)
                  arithmetic_fwd_s=2 * case.macs / rate)
    for m in result['impls'].values():
        m.update(roofline_fwd=result['roofline_fwd_s'] / m['fwd_s'],
                 roofline_fwdbwd=result['roofline_fwdbwd_s'] / m['fwdbwd_s'],
                 gemm_rate_fwd=result['arithmetic_fwd_s'] / m['fwd_s'])
    return result


def run_ops(args: argparse.Namespace, device: torch.device, ours: str) -> dict:
    """Op-level benchmark over the selected cases; prints one table per case."""
    from overlock_mm.ops import available_impls
    # Device-bound implementations fall back to 'native' elsewhere: list them on their device only
    # (on CUDA that includes 'triton', which registers itself where triton and a GPU are present).
    device_only = {'cpu': 'cpu', 'triton': 'cuda'}
    impls = [i for i in available_impls() if device_only.get(i, device.type) == device.type]
    if args.impls:
        impls = [i for i in impls if i in args.impls]
        if not impls:
            raise SystemExit(f'benchmark.py: none of --impls {" ".join(args.impls)} runs on '
                             f'{device.type} here (available: {", ".join(available_impls())})')
    variants = args.variants or (['xt', 't', 's', 'b'] if args.full else ['t'])
    tasks = args.tasks or ['cls', 'det', 'seg']
    kernels = ['large', 'small']
    cases = op_cases(variants, tasks, kernels, args.cls_batch, args.dense_batch)
    print(f'\n== Op level: na2d_av, {len(cases)} cases, impls {impls} + dwconv; ours = {ours!r}; '
          f'warm-up {args.warmup}, median of >= {args.repeat} calls and >= {args.min_time} s '
          f'(reference: warm-up {min(args.warmup, 1)}, {args.ref_repeat} calls) ==')
    print('  ref/x: reference time / this time; %roof: the op\'s roofline time (its bytes / copy '
          'bandwidth) / this time; mem/ref: fwd+bwd peak / reference\'s')
    hdr = (f'  {"impl":10} {"fwd ms":>9} {"f+b ms":>9} {"f+b peak MB":>12} {"ref/x fwd":>10} '
           f'{"ref/x f+b":>10} {"%roof fwd":>10} {"mem/ref":>8} {"GFLOP/s fwd":>12} '
           f'{"max|err|":>9}')
    results = []
    for case in cases:
        # The copy bandwidth of a shared VM drifts within minutes and scatters between calls:
        # each case's roofline uses the median of samples taken during the case (bench_op_case),
        # not the bandwidth from the run's start.
        r = bench_op_case(case, impls, device, args.warmup, args.repeat, args.ref_repeat,
                          args.min_time)
        r['loadavg_after'] = _loadavg()
        results.append(r)
        samples = r['copy_bandwidth_samples_GBps']
        print(f'{case.name}: fwd moves {r["bytes_fwd"] / 1e6:.1f} MB -> roofline '
              f'{r["roofline_fwd_s"] * 1e3:.3f} ms at {r["copy_bandwidth_GBps"]:.1f} GB/s (median '
              f'of {len(samples)} samples during the case, {min(samples):.1f}-{max(samples):.1f}); '
              f'fwd+bwd {r["roofline_fwdbwd_s"] * 1e3:.3f} ms; fwd FLOPs at the GEMM rate '
              f'({r["gemm_GFLOPs"]:.0f} GFLOP/s) {r["arithmetic_fwd_s"] * 1e3:.3f} ms')
        print(hdr)
        ref = r['impls'].get('reference')
        for name, m in r['impls'].items():
            sf = ref['fwd_s'] / m['fwd_s'] if ref else float('nan')
            sfb = ref['fwdbwd_s'] / m['fwdbwd_s'] if ref else float('nan')
            mr = (m['fwdbwd_peak_bytes'] / ref['fwdbwd_peak_bytes']
                  if ref and ref['fwdbwd_peak_bytes'] and m['fwdbwd_peak_bytes'] is not None
                  else float('nan'))
            m.update(speedup_fwd=sf, speedup_fwdbwd=sfb, mem_ratio=mr)
            peak = (f'{m["fwdbwd_peak_bytes"] / 2**20:12.1f}'
                    if m['fwdbwd_peak_bytes'] is not None else f'{"n/a":>12}')
            print(f'  {name:10} {m["fwd_s"] * 1e3:9.3f} {m["fwdbwd_s"] * 1e3:9.2f} {peak} '
                  f'{sf:10.1f} {sfb:10.1f} {100 * m["roofline_fwd"]:9.1f}% {mr:8.3f} '
                  f'{2 * r["macs"] / m["fwd_s"] / 1e9:12.2f} '
                  f'{m.get("max_abs_err_fwd", float("nan")):9.1e}')
        sys.stdout.flush()
    return dict(impls=impls, ours=ours, cases=results)


# ----------------------------------------------------------------------------- model level
#: warm-up steps of a compiled row at least (see compile_warmup)
COMPILE_WARMUP = 3


@dataclass
class ModelConfig:
    """One model-level measurement."""

    variant: str
    task: str
    mode: str  # 'infer' or 'train'
    impl: str  # contmix_impl: 'auto' or 'reference'
    deploy: bool = False
    with_cp: Union[bool, Tuple[bool, ...]] = False
    torch_dwconv: bool = False  # PyTorch's dw convs and GRN formula (torch_layers)
    memory_efficient: bool = True  # OverLoCK(memory_efficient=...): selective recomputation
    compile_mode: Optional[str] = None  # model.compile(mode=..., fullgraph=True); None: eager
    batch: int = 1
    size: Tuple[int, int] = (224, 224)
    results: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        extra = ((' deploy' if self.deploy else '') + cp_label(self.with_cp)
                 + (' torch-dwconv' if self.torch_dwconv else '')
                 + ('' if self.memory_efficient else ' memory_efficient=False')
                 + (f' compiled={self.compile_mode}' if self.compile_mode else ''))
        return (f'{self.variant}-{self.task} {self.mode:5} {self.impl:9}{extra} '
                f'b{self.batch} {self.size[1]}x{self.size[0]}')


def cp_label(with_cp: Union[bool, Sequence[bool]]) -> str:
    """`` with_cp`` / `` with_cp=1100`` (per-resolution flags) / ``''``."""
    if isinstance(with_cp, bool):
        return ' with_cp' if with_cp else ''
    return ' with_cp=' + ''.join('1' if c else '0' for c in with_cp)


def model_configs(variants: Sequence[str], tasks: Sequence[str], full: bool, cls_batch: int,
                  modes: Sequence[str] = ('infer', 'train'),
                  cp_stages: Sequence[Tuple[bool, ...]] = (),
                  torch_dwconv: bool = False, dense_batch: int = 1,
                  compile_modes: Sequence[str] = ()) -> List[ModelConfig]:
    """The combinations to run.

    Without ``full`` the reference is not re-parameterised or checkpointed (those rows cost
    minutes each on a CPU and answer no target). ``cp_stages`` adds training rows of our op
    with checkpointing at some resolutions only (``OverLoCK(with_cp=(s4, s8, s16, s32))``).
    Our op's training row without selective recomputation (``memory_efficient=False``) is
    always added.
    ``torch_dwconv`` adds, per mode, the reference and our op run with plain ``F.conv2d``
    depthwise convolutions (none of ops/dwconv.py's paths) and GRN as autograd's formula
    (:func:`torch_layers`): the former is the authors' network as it runs, the latter shows
    what those layers save our network. ``compile_modes`` add, per
    mode, our op's default row with the backbone compiled (``torch.compile`` mode names).
    """
    configs = []
    for variant in variants:
        for task in tasks:
            kw = dict(batch=cls_batch if task == 'cls' else dense_batch, size=MODEL_INPUTS[task])
            if torch_dwconv:
                configs += [ModelConfig(variant, task, mode, impl, torch_dwconv=True, **kw)
                            for mode in modes for impl in ('reference', 'auto')]
            for impl in ('reference', 'auto') if 'infer' in modes else ():
                for deploy in (False, True):
                    if deploy and impl == 'reference' and not full:
                        continue
                    configs.append(ModelConfig(variant, task, 'infer', impl, deploy=deploy, **kw))
            for impl in ('reference', 'auto') if 'train' in modes else ():
                for cp in (False, True):
                    if cp and impl == 'reference' and not full:
                        continue
                    configs.append(ModelConfig(variant, task, 'train', impl, with_cp=cp, **kw))
                if impl == 'auto':
                    configs.append(ModelConfig(variant, task, 'train', impl,
                                               memory_efficient=False, **kw))
                    for stages in cp_stages:
                        configs.append(ModelConfig(variant, task, 'train', impl,
                                                   with_cp=tuple(stages), **kw))
            configs += [ModelConfig(variant, task, mode, 'auto', compile_mode=cm, **kw)
                        for mode in modes for cm in compile_modes]
    return configs


@contextlib.contextmanager
def torch_layers() -> Iterator[None]:
    """The ``--torch-dwconv`` rows' layers: PyTorch's depthwise convolutions (none of
    ops/dwconv.py's paths) and GRN as autograd's formula (ops/grn.py) -- the authors' layers."""
    from overlock_mm.ops.dwconv import torch_depthwise
    from overlock_mm.ops.grn import unfused_grn
    with torch_depthwise(), unfused_grn():
        yield


def model_step(cfg: ModelConfig, device: torch.device) -> Callable[[], object]:
    """A freshly built backbone's step (inference or training, see :class:`ModelConfig`)."""
    from overlock_mm import OverLoCK
    torch.manual_seed(0)
    model = OverLoCK(cfg.variant, layout=LAYOUT[cfg.task], contmix_impl=cfg.impl,
                     with_cp=cfg.with_cp, memory_efficient=cfg.memory_efficient).to(device)
    if cfg.deploy:
        model.eval()
        model.switch_to_deploy()
    if cfg.compile_mode:
        # in place: one graph (README, "torch.compile"); compiled on the first step(s)
        model.compile(mode=None if cfg.compile_mode == 'default' else cfg.compile_mode,
                      fullgraph=True)
    x = torch.randn(cfg.batch, 3, *cfg.size, device=device)
    dwconv = torch_layers if cfg.torch_dwconv else contextlib.nullcontext
    if cfg.mode == 'infer':
        model.eval()

        def step():
            with dwconv(), torch.no_grad():
                return model(x)
    else:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step():
            with dwconv():
                opt.zero_grad(set_to_none=True)
                loss = sum(o.float().mean() for o in model(x))
                loss.backward()
                opt.step()

    return step


def compile_warmup(cfg: ModelConfig, warmup: int) -> int:
    """Warm-up steps of a row: a compiled model compiles in its first step, and
    ``mode='reduce-overhead'`` records its CUDA graphs in the next ones, so those rows take at
    least 3 whatever ``--model-warmup`` says."""
    return max(warmup, COMPILE_WARMUP) if cfg.compile_mode else warmup


def model_peak(cfg: ModelConfig, device: torch.device) -> Optional[int]:
    """Peak memory of one step of a fresh model, in the meter's allocator mode (a compiled
    model's after its warm-up, which compiles)."""
    step = model_step(cfg, device)
    for _ in range(compile_warmup(cfg, 0)):
        step()
    with PeakMemory(device) as mem:
        step()
        synchronize(device)
    del step
    gc.collect()
    return mem.peak


def model_time(cfg: ModelConfig, device: torch.device, warmup: int, repeat: int) -> dict:
    """Step times of a fresh model, with glibc reusing freed blocks (:func:`malloc_reuse`)."""
    step = model_step(cfg, device)
    with malloc_reuse():
        times = time_it(step, device, compile_warmup(cfg, warmup), repeat)
        del step
        gc.collect()
    t = statistics.median(times)
    return dict(time_s=t, times=times, img_per_s=cfg.batch / t)


def run_models(args: argparse.Namespace, device: torch.device) -> dict:
    """Model-level benchmark; prints one row per configuration.

    Two passes over the configurations: first one step of each for its peak memory, then the
    timed steps. On a CPU the meter needs glibc to hand every freed tensor back to the OS
    (``MALLOC_MMAP_THRESHOLD_``, module docstring), a mode in which every tensor is a fresh
    ``mmap`` whose pages fault in on first touch -- no user's process runs like that, so steps
    are timed with glibc reusing freed blocks (:func:`malloc_reuse`). But a heap that has grown
    that way serves later large requests from its free chunks instead of ``mmap``, and then keeps
    them: measured on the 2-core VM, a ``with_cp=True`` training step read 1231 MB, and 1528 MB
    right after one timed step (the heap then held 2.3 GB of free chunks). Hence every
    measurement of memory comes before the first timed step. Until the night of 2026-11-28 each
    step was timed in the meter's mode: an OverLoCK-T detection training step took 30.7 s there
    (13.1 M page faults) against 18.4 s with glibc's defaults (4.6 M), the reference 72 s
    against 51 s.
    """
    variants = args.variants or (['xt', 't', 's', 'b'] if args.full else ['t'])
    tasks = args.tasks or (['cls', 'det', 'seg'] if args.full else ['det'])
    cp_stages = [tuple(c == '1' for c in flags) for flags in args.cp_stages or ()]
    configs = model_configs(variants, tasks, args.full, args.cls_batch, args.modes, cp_stages,
                            args.torch_dwconv, args.dense_batch, args.compile or ())
    warmup = args.model_warmup
    repeat = args.model_repeat
    print(f'\n== Model level: backbone only, {len(configs)} configurations; peak memory: one '
          f'step each; then time: warm-up {warmup}, median of {repeat} ==')
    peaks = []
    for cfg in configs:
        peaks.append(model_peak(cfg, device))
        mb = f'{peaks[-1] / 2**20:.0f} MB' if peaks[-1] is not None else 'n/a'
        print(f'  peak memory of {cfg.name}: {mb}')
        sys.stdout.flush()
    print(f'  {"configuration":58} {"time s":>9} {"img/s":>8} {"peak MB":>9}')
    rows = []
    for cfg, peak in zip(configs, peaks):
        cfg.results = dict(model_time(cfg, device, warmup, repeat), peak_bytes=peak,
                           loadavg_after=_loadavg())
        r = cfg.results
        mb = f'{peak / 2**20:9.0f}' if peak is not None else f'{"n/a":>9}'
        print(f'  {cfg.name:58} {r["time_s"]:9.3f} {r["img_per_s"]:8.2f} {mb}')
        sys.stdout.flush()
        rows.append(asdict(cfg))
    return dict(configs=rows)


# ----------------------------------------------------------------------------- targets
def dwconv_cases(variant: str, task: str, device: torch.device) -> List[dict]:
    """The depthwise convolutions of a training-mode backbone at a task's input size.

    Read from the model itself (forward pre-hooks on every ``DWConv2d``), with how many modules
    share each (channels, kernel, dilation, padding, map) case.
    """
    from overlock_mm import OverLoCK
    from overlock_mm.layers.conv import DWConv2d
    model = OverLoCK(variant, layout=LAYOUT[task]).to(device)
    seen: Dict[tuple, int] = {}

    def hook(mod, inputs):
        x = inputs[0]
        key = (x.shape[0], mod.in_channels, mod.kernel_size[0], mod.dilation[0], mod.padding[0],
               x.shape[2], x.shape[3])
        seen[key] = seen.get(key, 0) + 1

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, DWConv2d)]
    with torch.no_grad():
        model(torch.zeros(1 if task != 'cls' else 4, 3, *MODEL_INPUTS[task], device=device))
    for h in handles:
        h.remove()
    return [dict(batch=b, channels=c, kernel=k, dilation=d, padding=p, map=(hh, ww), count=n)
            for (b, c, k, d, p, hh, ww), n in sorted(seen.items(), key=lambda kv: -kv[0][5])]


def run_dwconv(args: argparse.Namespace, device: torch.device) -> dict:
    """PyTorch's depthwise conv vs overlock_mm's (ops/dwconv.py) at the backbone's own cases."""
    from overlock_mm.ops.dwconv import depthwise_conv2d, torch_depthwise
    variants = args.variants or ['t']
    tasks = args.tasks or ['det']
    print('\n== Depthwise convolutions: torch (F.conv2d) vs ours (overlock_mm.ops.dwconv), '
          'per case and summed over the backbone ==')
    print(f'  {"case (B C k dil map) x modules":40} {"fwd torch":>10} {"fwd ours":>9} '
          f'{"f+b torch":>10} {"f+b ours":>9} {"f+b ratio":>9}')
    out = []
    for variant in variants:
        for task in tasks:
            cases = dwconv_cases(variant, task, device)
            totals = dict(fwd_torch=0., fwd_ours=0., fwdbwd_torch=0., fwdbwd_ours=0.)
            for case in cases:
                b, c, k, d, p = (case[key] for key in
                                 ('batch', 'channels', 'kernel', 'dilation', 'padding'))
                x = torch.randn(b, c, *case['map'], device=device, requires_grad=True)
                w = (0.1 * torch.randn(c, 1, k, k, device=device)).requires_grad_()
                gy = torch.randn_like(x)
                res = {}
                for name, ctx in (('torch', torch_depthwise), ('ours', contextlib.nullcontext)):
                    def fwd():
                        with ctx(), torch.no_grad():
                            return depthwise_conv2d(x, w, None, 1, p, d)

                    def fwdbwd():
                        with ctx():
                            torch.autograd.backward(depthwise_conv2d(x, w, None, 1, p, d), gy)
                        x.grad = w.grad = None

                    res['fwd_' + name] = statistics.median(
                        time_it(fwd, device, args.warmup, args.repeat, args.min_time))
                    res['fwdbwd_' + name] = statistics.median(
                        time_it(fwdbwd, device, args.warmup, args.repeat, args.min_time))
                for key in totals:
                    totals[key] += res[key] * case['count']
                case.update(res)
                label = f'{b} {c} {k} d{d} {case["map"][0]}x{case["map"][1]} x{case["count"]}'
                print(f'  {label:40} {res["fwd_torch"] * 1e3:10.2f} {res["fwd_ours"] * 1e3:9.2f} '
                      f'{res["fwdbwd_torch"] * 1e3:10.2f} {res["fwdbwd_ours"] * 1e3:9.2f} '
                      f'{res["fwdbwd_ours"] / res["fwdbwd_torch"]:9.3f}')
            print(f'  {variant}-{task} all depthwise convs: forward {totals["fwd_torch"]:.3f} s -> '
                  f'{totals["fwd_ours"]:.3f} s, forward+backward {totals["fwdbwd_torch"]:.3f} s '
                  f'-> {totals["fwdbwd_ours"]:.3f} s '
                  f'({totals["fwdbwd_ours"] / totals["fwdbwd_torch"]:.3f}x)')
            out.append(dict(variant=variant, task=task, cases=cases, totals=totals))
    return dict(results=out)


def evaluate_targets(ops: Optional[dict], models: Optional[dict], ours: str) -> List[dict]:
    """PASS/FAIL of each issue-5 target that this run measured (worst case over cases)."""
    values: Dict[str, Tuple[float, str]] = {}
    targets = list(TARGETS)
    if ops:
        det = [c for c in ops['cases'] if c['case']['task'] == 'det'
               and ours in c['impls'] and 'reference' in c['impls']]
        if det:
            def worst(key: str, fn: Callable[[dict, dict], float], pick=min):
                vals = [(fn(c['impls'][ours], c['impls']['reference']), c['name']) for c in det]
                values[key] = pick(vals)

            worst('op_fwd_speedup', lambda o, r: r['fwd_s'] / o['fwd_s'])
            worst('op_fwdbwd_speedup', lambda o, r: r['fwdbwd_s'] / o['fwdbwd_s'])
            # (no ratio where the meter read nothing for the reference: --no-reexec on a CPU)
            if all(c['impls'][ours]['fwdbwd_peak_bytes'] is not None
                   and c['impls']['reference']['fwdbwd_peak_bytes'] for c in det):
                worst('op_mem_ratio', lambda o, r: o['fwdbwd_peak_bytes'] / r['fwdbwd_peak_bytes'],
                      max)
            worst('op_roofline', lambda o, r: o['roofline_fwd'])
    if models:
        train = [c for c in models['configs'] if (c['variant'], c['task'], c['mode'], c['deploy'])
                 == ('t', 'det', 'train', False)]

        def default_row(impl: str, torch_dwconv: bool = False) -> Optional[dict]:
            """The training row of ``impl`` at the default settings (no with_cp,
            memory_efficient), with or without our depthwise-conv paths."""
            return next((c for c in train if c['impl'] == impl and c['with_cp'] is False
                         and bool(c.get('torch_dwconv')) == torch_dwconv
                         and c.get('memory_efficient', True) and not c.get('compile_mode')),
                        None)

        ref = (default_row('reference') or {}).get('results')
        for c in train:
            if c['impl'] != 'auto' or c.get('torch_dwconv') or not ref:
                continue
            o, cp, lean = c['results'], c['with_cp'], c.get('memory_efficient', True)
            compiled = c.get('compile_mode')
            suffix = '' if cp is False else '_cp' if cp is True else '_cp' + cp_label(cp)[9:]
            if not lean:
                suffix += '_keep_all'
            if compiled:
                suffix += f'_compiled_{compiled}'
            if suffix not in ('', '_cp'):  # other settings: reported, same thresholds
                label = (f'same, ours with{cp_label(cp)}'
                         + ('' if lean else ' memory_efficient=False')
                         + (f' compiled ({compiled}; the reference eager)' if compiled else ''))
                targets.append(('train_time_ratio' + suffix, label + ': time / reference', 0.5,
                                '<='))
                targets.append(('train_mem_ratio' + suffix, label + ': peak memory / reference',
                                0.5, '<='))
            where = f't-det train b{c["batch"]}'
            values['train_time_ratio' + suffix] = (o['time_s'] / ref['time_s'], where)
            if o['peak_bytes'] and ref['peak_bytes']:
                values['train_mem_ratio' + suffix] = (o['peak_bytes'] / ref['peak_bytes'], where)
    authors_note = None
    if models:
        # not a target: our default training step against the authors' network as it runs
        # (reference op and plain depthwise convolutions, --torch-dwconv)
        authors, ours_default = default_row('reference', torch_dwconv=True), default_row('auto')
        if authors and ours_default:
            o, a = ours_default['results'], authors['results']
            authors_note = dict(
                key='train_vs_authors', description="OverLoCK-T train step, ours (default) / the "
                "authors' network (reference op, plain depthwise convs)", threshold=None, op=None,
                value=o['time_s'] / a['time_s'], worst=f't-det train b{ours_default["batch"]}',
                status='INFO',
                memory=(o['peak_bytes'] / a['peak_bytes'] if o['peak_bytes'] and a['peak_bytes']
                        else None))
    out = []
    print('\n== Targets (worst case over the measured detection-size cases) ==')
    for key, desc, thr, op in targets:
        if key not in values:
            print(f'  SKIP  {desc}: not measured in this run')
            out.append(dict(key=key, description=desc, threshold=thr, op=op, value=None,
                            status='SKIP'))
            continue
        v, where = values[key]
        ok = v >= thr if op == '>=' else v <= thr
        status = 'PASS' if ok else 'FAIL'
        print(f'  {status}  {desc}: {v:.3f} (target {op} {thr}; worst: {where})')
        out.append(dict(key=key, description=desc, threshold=thr, op=op, value=v, worst=where,
                        status=status))

    def info(key: str, description: str, worst: Tuple[float, str]) -> None:
        out.append(dict(key=key, description=description + ' (not a target)', threshold=None,
                        op=None, value=worst[0], worst=worst[1], status='INFO'))

    if ops and det and all('copy' in c['impls'] for c in det):
        # not a target: how close the one-launch copy of the same bytes gets (the bound at
        # these sizes), and our forward's time against it
        copy = min((c['impls']['copy']['roofline_fwd'], c['name']) for c in det)
        ours_vs_copy = min((c['impls']['copy']['fwd_s'] / c['impls'][ours]['fwd_s'], c['name'])
                           for c in det)
        print(f'  note  a copy of the op\'s forward bytes reaches {copy[0]:.3f} of the roofline '
              f'(worst: {copy[1]}); our forward runs at {ours_vs_copy[0]:.3f} of that copy\'s '
              f'speed (worst: {ours_vs_copy[1]})')
        info('op_copy_roofline', 'copy of the forward bytes, fraction of the roofline', copy)
        info('op_fwd_vs_copy', 'copy time / our forward time', ours_vs_copy)
    if ops and det and all('arithmetic_fwd_s' in c for c in det):
        # not a target: the other side of the roofline model. Where the forward's FLOPs at the
        # GEMM rate take a large part of the roofline's time, 50 % of the memory roofline asks
        # for near-GEMM arithmetic while streaming; against max(bytes / bandwidth, FLOPs /
        # GEMM rate) the forward's fraction shows what the machine allows.
        heavy = max((c['arithmetic_fwd_s'] / c['roofline_fwd_s'], c['name']) for c in det)
        model = min((max(c['roofline_fwd_s'], c['arithmetic_fwd_s']) / c['impls'][ours]['fwd_s'],
                     c['name']) for c in det)
        print(f'  note  the forward\'s FLOPs at the GEMM rate take {heavy[0]:.3f} of the memory '
              f'roofline\'s time (most: {heavy[1]}); against the roofline model, max(bytes / '
              f'bandwidth, FLOPs / GEMM rate), our forward reaches {model[0]:.3f} (worst: '
              f'{model[1]})')
        info('op_arithmetic_vs_roofline', 'forward FLOPs at the GEMM rate / memory roofline time',
             heavy)
        info('op_roofline_model', 'max(memory roofline, FLOPs at the GEMM rate) / our forward '
             'time', model)
    if authors_note:
        note = authors_note
        mem = '' if note['memory'] is None else f', peak memory {note["memory"]:.3f}'
        print(f'  note  {note["description"]}: time {note["value"]:.3f}{mem} ({note["worst"]})')
        out.append(note)
    return out


# ----------------------------------------------------------------------------- main
def machine_info(device: torch.device) -> dict:
    """Device, software and load facts recorded with the numbers."""
    info = dict(torch=torch.__version__, python=platform.python_version(),
                platform=platform.platform(), device=str(device),
                torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count())
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    try:
        with open('/proc/cpuinfo') as f:
            info['cpu'] = next(line.split(':', 1)[1].strip() for line in f
                               if line.startswith('model name'))
    except (OSError, StopIteration):
        info['cpu'] = platform.processor()
    if hasattr(os, 'getloadavg'):
        info['loadavg_start'] = os.getloadavg()
    return info


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ops', action='store_true',
                        help='run the op level (default, with no level flag: all three levels)')
    parser.add_argument('--models', action='store_true', help='run the model level')
    parser.add_argument('--dwconv', action='store_true',
                        help="run the depthwise-conv level (the backbone's own dw convs, "
                             'torch vs ours)')
    parser.add_argument('--variants', nargs='+', choices=['xt', 't', 's', 'b'],
                        help='variants (default: t; --full: all)')
    parser.add_argument('--tasks', nargs='+', choices=['cls', 'det', 'seg'],
                        help='tasks (default ops: all; models: det; --full: all)')
    parser.add_argument('--impls', nargs='+', help='restrict the op-level implementations')
    parser.add_argument('--modes', nargs='+', choices=['infer', 'train'],
                        default=['infer', 'train'], help='model-level modes (default: both)')
    parser.add_argument('--cp-stages', nargs='*', metavar='FLAGS', default=['1000'],
                        help='extra training rows of our op with checkpointing per resolution, '
                             'e.g. 1100 = with_cp=(True, True, False, False) (strides 4/8 only); '
                             'default 1000 (the configuration that meets both step targets); '
                             'pass the flag alone for none')
    parser.add_argument('--torch-dwconv', action='store_true',
                        help='also run the reference and our op with plain F.conv2d depthwise '
                             'convolutions, none of our depthwise-conv paths (the CPU kernels, '
                             'the CUDA layout choice), and GRN as autograd\'s formula (not '
                             'ops/grn.py): the authors\' network as it runs, and what those '
                             'layers save ours')
    parser.add_argument('--compile', nargs='+', metavar='MODE',
                        choices=['default', 'reduce-overhead', 'max-autotune',
                                 'max-autotune-no-cudagraphs'],
                        help='also run our op\'s default rows with the backbone compiled '
                             '(model.compile(mode=MODE, fullgraph=True); at least 3 warm-up '
                             'steps, the first compiles: minutes per row), e.g. reduce-overhead '
                             '(CUDA graphs) for the host-bound batch-1 GPU step')
    parser.add_argument('--full', action='store_true',
                        help='every variant, task and combination (hours on a CPU)')
    parser.add_argument('--quick', action='store_true',
                        help='fewer repetitions (op: warm-up 1, median of >= 3 calls / 0.1 s, '
                             'reference 1 call)')
    parser.add_argument('--repeat', type=int, help='op-level timed repetitions (default 5)')
    parser.add_argument('--warmup', type=int, help='op-level warm-up calls (default 2)')
    parser.add_argument('--min-time', type=float,
                        help='time fast op calls for at least this many seconds (default 0.5)')
    parser.add_argument('--ref-repeat', type=int,
                        help='timed repetitions of the slow reference op (default 3)')
    parser.add_argument('--model-repeat', type=int, help='model-level timed steps (default 1)')
    parser.add_argument('--model-warmup', type=int,
                        help='model-level warm-up steps (default 0: the first step is timed, '
                             'like docs/performance.md\'s anchors; 1 for steadier numbers)')
    parser.add_argument('--cls-batch', type=int, default=4,
                        help='batch size of the classification cases (default 4)')
    parser.add_argument('--dense-batch', type=int, default=1,
                        help='batch size of the detection and segmentation cases, op and model '
                             'level (default 1, as the targets are stated; a GPU is only filled '
                             'by more, and the papers\' recipes train with 2 images per GPU)')
    parser.add_argument('--threads', type=int,
                        help='torch (and CPU kernel) threads; 1 is the robust choice when '
                             'another process shares the cores (default: torch\'s default)')
    parser.add_argument('--device', default=None, help="'cuda' or 'cpu' (default: cuda if present)")
    parser.add_argument('--cudnn-benchmark', action='store_true',
                        help='CUDA: let cuDNN time its algorithms per shape (torch.backends.cudnn.'
                             'benchmark, mmengine env_cfg cudnn_benchmark=True); both sides')
    parser.add_argument('--json', help='write every number to this file')
    parser.add_argument('--no-reexec', action='store_true',
                        help=f'do not restart with {_MMAP_ENV} (CPU peak memory less exact)')
    args = parser.parse_args(argv)
    # checked now, not after the op level's minutes
    for flags in args.cp_stages or ():
        if len(flags) != 4 or set(flags) - {'0', '1'}:
            parser.error(f'--cp-stages {flags}: give 4 digits 0/1, one per resolution (stride 4, '
                         '8, 16, 32), e.g. 1100')
    if args.impls:
        from overlock_mm.ops import known_impls
        unknown = sorted(set(args.impls) - set(known_impls()) | ({'auto'} & set(args.impls)))
        if unknown:
            parser.error(f'--impls {" ".join(unknown)}: not an implementation; valid: '
                         f'{" ".join(i for i in known_impls() if i != "auto")}')
    if not (args.ops or args.models or args.dwconv):
        args.ops = args.models = args.dwconv = True
    quick = args.quick
    defaults = dict(repeat=3 if quick else 5, warmup=1 if quick else 2,
                    min_time=0.1 if quick else 0.5,
                    ref_repeat=1 if quick else 3, model_repeat=1, model_warmup=0)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the selected benchmarks, print the tables and targets, write JSON if asked."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    import overlock_mm  # noqa: F401 - registers the ops, builds/loads the CPU kernel lazily
    from overlock_mm.ops import auto_impl
    ours = auto_impl(device.type)
    info = machine_info(device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
        info['cudnn_benchmark'] = torch.backends.cudnn.benchmark
    if device.type == 'cpu' and ours == 'cpu':
        from overlock_mm.ops import na2d_cpu
        info['cpu_kernel_available'] = na2d_cpu.is_available()
        if not info['cpu_kernel_available']:
            print(f"WARNING: the 'cpu' kernel did not build ({na2d_cpu.build_error()}); "
                  "'cpu' rows are the 'native' implementation.")
    bw = copy_bandwidth(device)
    info['copy_bandwidth_GBps'] = bw / 1e9
    info['memory_method'] = PeakMemory.method(device)
    info['memory_calibration'] = calibrate_memory_meter(device)
    print(f'device {device} ({info.get("gpu", info["cpu"])}), torch {torch.__version__}, '
          f'{info["torch_threads"]} threads, load average {info.get("loadavg_start")}')
    print(f'copy bandwidth (dst.copy_(src), 256 MB, read+write): {bw / 1e9:.2f} GB/s')
    cal = info['memory_calibration']
    print(f'peak memory: {info["memory_method"]}; calibration 200 MB -> '
          f'{"n/a" if cal is None else f"{cal * 200:.1f} MB"}')
    t0 = time.perf_counter()
    ops = run_ops(args, device, ours) if args.ops else None
    dwconv = run_dwconv(args, device) if args.dwconv else None
    models = run_models(args, device) if args.models else None
    targets = evaluate_targets(ops, models, ours)
    info['wall_s'] = time.perf_counter() - t0
    if hasattr(os, 'getloadavg'):
        info['loadavg_end'] = os.getloadavg()
    print(f'\ntotal {info["wall_s"]:.0f} s; load average at end {info.get("loadavg_end")}')
    report = dict(machine=info, args=vars(args), ops=ops, dwconv=dwconv, models=models,
                  targets=targets)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=1, default=str)
        print(f'wrote {args.json}')
    return report


if __name__ == '__main__':
    main()
