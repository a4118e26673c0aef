"""The 'cpu' na2d kernel's worker pool (csrc/thread_pool.h): thread counts, concurrent callers,
fork.

Every result is compared with the single-threaded call, which never touches the pool; each task
(a group, or a group's band of rows) is computed the same way whichever thread runs it, so the
results must be bit-identical. A task that no thread ran, or ran twice, or a job handed to a
worker that does not exist, shows up as a wrong value or as a call that never returns (the tests
bound every wait).
"""
import multiprocessing
import threading

import pytest
import torch

from overlock_mm.ops import na2d_av, na2d_cpu

pytestmark = pytest.mark.skipif(not na2d_cpu.is_available(),
                                reason=f"'cpu' kernel unavailable: {na2d_cpu.build_error()}")

# 12 groups: more tasks than threads; 21 x 37 map, k = 7: border and interior blocks
B, G, D, H, W, K = 2, 6, 16, 21, 37, 7


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    attn = torch.randn(B, G, K * K, H, W, generator=gen).softmax(2)
    value = torch.randn(B, G, D, H, W, generator=gen)
    grad = torch.randn(B, G, D, H, W, generator=gen)
    return attn, value, grad


def run(attn, value, grad):
    a, v = attn.clone().requires_grad_(), value.clone().requires_grad_()
    out = na2d_av(a, v, K, impl='cpu')
    out.backward(grad)
    return out.detach(), a.grad, v.grad


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_thread_counts_agree(threads):
    attn, value, grad = inputs()
    torch.set_num_threads(1)
    expected = run(attn, value, grad)
    # growing the pool (3, 5 threads on any machine), then jobs that use only some workers
    for n in (2, 3, 5, 2, 1, 4):
        torch.set_num_threads(n)
        for got, want in zip(run(attn, value, grad), expected):
            assert torch.equal(got, want), n


def test_concurrent_callers(threads):
    """Python threads call the kernel at once (ctypes releases the GIL): one gets the pool, the
    others threads of their own; none may see another's job."""
    torch.set_num_threads(2)
    cases = [inputs(seed) for seed in range(4)]
    torch.set_num_threads(1)
    expected = [run(*c) for c in cases]
    torch.set_num_threads(2)
    errors = []

    def worker(i):
        try:
            for _ in range(20):
                for got, want in zip(run(*cases[i]), expected[i]):
                    assert torch.equal(got, want)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(f'{i}: {type(e).__name__} {e}')

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(cases))]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in pool), 'a concurrent call never returned'
    assert not errors, errors


def _child_forward(attn, value, queue):
    # torch may give a forked child one thread, so the kernel is asked for two directly
    out = torch.empty_like(value)
    na2d_cpu.load().na2d_forward_f32(attn.data_ptr(), value.data_ptr(), out.data_ptr(),
                                     B * G, D, H, W, K, 0, 2)  # 0: attn contiguous
    queue.put(out.numpy().tobytes())  # plain bytes: the child exits before the parent reads


@pytest.mark.skipif('fork' not in multiprocessing.get_all_start_methods(), reason='no fork')
def test_forked_child_gets_its_own_pool(threads):
    """The parent's workers do not exist in a forked child: it must build a new pool."""
    attn, value, _ = inputs()
    torch.set_num_threads(2)
    expected = na2d_cpu.forward(attn, value, K)  # the parent's pool now exists
    ctx = multiprocessing.get_context('fork')
    queue = ctx.Queue()
    child = ctx.Process(target=_child_forward, args=(attn, value, queue))
    child.start()
    try:
        got = torch.frombuffer(bytearray(queue.get(timeout=120)), dtype=torch.float32)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    assert torch.equal(got.view_as(expected), expected)
