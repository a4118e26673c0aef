"""The benchmark harness runs end to end (smallest settings) and reports what it measured.

Not a timing test: it asserts only on structure and on the numerical cross-check the harness
makes itself (every implementation's forward equals the reference within 1e-4)."""
import contextlib
import json
import statistics

import pytest

from tool_utils import load_tool


def load_benchmark():
    return load_tool('tools/analysis/benchmark.py', 'olk_benchmark')


def test_ops_and_dwconv_levels(tmp_path):
    bench = load_benchmark()
    out = tmp_path / 'bench.json'
    report = bench.main(['--ops', '--dwconv', '--quick', '--variants', 'xt', '--tasks', 'cls',
                         '--cls-batch', '1', '--min-time', '0', '--threads', '1',
                         '--no-reexec', '--json', str(out)])
    saved = json.loads(out.read_text())
    assert saved['machine']['copy_bandwidth_GBps'] > 0
    cases = report['ops']['cases']
    assert cases and all({'reference', 'dwconv', 'copy'} <= set(c['impls']) for c in cases)
    for c in cases:
        for name, r in c['impls'].items():
            assert r['fwd_s'] > 0 and r['fwdbwd_s'] > 0, (c['name'], name)
            if name not in ('dwconv', 'copy'):  # the bounds compute something else
                assert r['max_abs_err_fwd'] <= 1e-4, (c['name'], name, r['max_abs_err_fwd'])
    for c in cases:  # the roofline uses the median of the samples taken during the case
        samples = c['copy_bandwidth_samples_GBps']
        # before the case, between the forward bursts of each implementation but the
        # reference (cpu/native + dwconv + copy), after the case
        bursts = bench.FWD_BURSTS - 1
        assert len(samples) == 2 + bursts * (len(c['impls']) - 1), c['name']
        assert c['copy_bandwidth_GBps'] == pytest.approx(statistics.median(samples))
        # the arithmetic ceiling is sampled at the same moments, and the forward's FLOPs
        # (2 per multiply-add) at its median rate give arithmetic_fwd_s
        rates = c['gemm_samples_GFLOPs']
        assert len(rates) == len(samples) and min(rates) > 0, c['name']
        assert c['arithmetic_fwd_s'] == pytest.approx(
            2 * c['macs'] / (statistics.median(rates) * 1e9))
        for name, r in c['impls'].items():
            assert r['gemm_rate_fwd'] == pytest.approx(c['arithmetic_fwd_s'] / r['fwd_s'])
    dw = report['dwconv']['results'][0]
    # XT's depthwise convs at 224: the large 17x17 kernels of stride 4 are among them
    assert any(c['kernel'] == 17 for c in dw['cases'])
    assert all(c[k] > 0 for c in dw['cases']
               for k in ('fwd_torch', 'fwd_ours', 'fwdbwd_torch', 'fwdbwd_ours'))


def test_measure_splits_op_calls_into_bursts():
    bench = load_benchmark()
    calls, between = [], []
    t, times, peak = bench.measure(lambda: calls.append(1), bench.torch.device('cpu'), warmup=2,
                                   repeat=7, bursts=3,
                                   between=lambda: between.append(len(calls)))
    # 3 bursts of ceil(7 / 3) = 3 timed calls; warm-up 2, then 1 per later burst; memory call
    assert len(times) == 9 and len(between) == 2
    assert between == [2 + 3, 2 + 3 + 1 + 3]
    assert len(calls) == 2 + 3 + (1 + 3) * 2 + 1


def test_measure_times_outside_the_meters_allocator_mode(monkeypatch):
    """Op level: every timed call runs with glibc reusing freed blocks; only the extra memory
    call runs in the meter's mode (every block a fresh mmap, page faults on first touch)."""
    bench = load_benchmark()
    state = dict(reuse=False)
    seen = []
    monkeypatch.setattr(bench, 'malloc_reuse', _recording_reuse(state))
    bench.measure(lambda: seen.append(state['reuse']), bench.torch.device('cpu'), warmup=1,
                  repeat=2)
    assert seen == [True, True, True, False]


def _recording_reuse(state):
    @contextlib.contextmanager
    def reuse():
        state['reuse'] = True
        try:
            yield
        finally:
            state['reuse'] = False
    return reuse


def test_model_level_measures_every_peak_before_any_timed_step(monkeypatch):
    """A heap grown by timed steps (glibc reusing freed blocks) would serve the meter's later
    large requests from its free chunks and keep them resident: every model's peak is taken
    first, in the meter's mode, and each timed step runs with blocks reused, on a fresh model."""
    bench = load_benchmark()
    state = dict(reuse=False)
    events = []

    def fake_step(cfg, device):
        built = len([e for e in events if e[0] == 'build'])
        events.append(('build', cfg.name))
        return lambda: events.append(('step', cfg.name, built, state['reuse']))

    monkeypatch.setattr(bench, 'malloc_reuse', _recording_reuse(state))
    monkeypatch.setattr(bench, 'model_step', fake_step)
    args = bench.parse_args(['--models', '--modes', 'train', '--model-warmup', '1',
                             '--model-repeat', '2', '--device', 'cpu'])
    report = bench.run_models(args, bench.torch.device('cpu'))
    steps = [e for e in events if e[0] == 'step']
    n = len(report['configs'])
    assert n >= 3 and len(steps) == n * (1 + 1 + 2)
    peak_steps, timed_steps = steps[:n], steps[n:]
    assert all(not reuse for *_, reuse in peak_steps)  # the meter's mode
    assert all(reuse for *_, reuse in timed_steps)
    # one fresh model per peak and per timing (the build index differs for each)
    assert len({e[2] for e in steps}) == 2 * n
    assert all(len(c['results']['times']) == 2 for c in report['configs'])


def test_profile_step_prints_a_table():
    mod = load_tool('tools/analysis/profile_step.py', 'olk_profile_step')
    table = mod.main(['--variant', 'xt', '--task', 'cls', '--mode', 'train', '--warmup', '0',
                      '--rows', '5', '--device', 'cpu'])
    assert 'aten::' in table and 'Self CPU' in table


def test_profile_step_wall_times_add_up():
    """``--wall``: without recomputation every leaf module runs once inside the forward and every
    node inside the backward, so their sums stay within those times and cover most of them;
    convolution nodes carry their shapes."""
    import re
    mod = load_tool('tools/analysis/profile_step.py', 'olk_profile_step')
    text = mod.main(['--variant', 'xt', '--task', 'cls', '--wall', '--warmup', '1',
                     '--rows', '50', '--device', 'cpu', '--no-memory-efficient'])
    t_fwd, t_bwd = map(float, re.search(r'forward ([\d.]+) s, backward ([\d.]+) s', text).groups())
    leaves = float(re.search(r'\(([\d.]+) s in leaves', text).group(1))
    nodes = float(re.search(r'\(([\d.]+) s in nodes\)', text).group(1))
    assert 0.5 * t_fwd < leaves <= t_fwd
    assert 0.5 * t_bwd < nodes <= t_bwd
    assert 'ConvolutionBackward0 w[' in text and '_DepthwiseConv2dCPUBackward' in text


def test_profile_step_saved_census_sees_the_recomputation():
    """The census must find the dilated branches' saved maps without selective recomputation
    and a smaller total with it (the default)."""
    mod = load_tool('tools/analysis/profile_step.py', 'olk_profile_step')
    args = ['--variant', 'xt', '--task', 'cls', '--saved', '--rows', '40', '--device', 'cpu']
    plain = mod.main(args + ['--no-memory-efficient'])
    lean = mod.main(args)

    def total(text):
        return float(text.split('saved for backward: ')[1].split(' MiB')[0])

    assert 'DilatedReparamBlock/' in plain
    assert 'DilatedReparamBlock/' not in lean
    assert total(lean) < total(plain)


def _train_row(impl, batch, time_s, peak, torch_dwconv=False, lean=True, with_cp=False):
    return dict(variant='t', task='det', mode='train', deploy=False, impl=impl, batch=batch,
                with_cp=with_cp, torch_dwconv=torch_dwconv, memory_efficient=lean,
                results=dict(time_s=time_s, peak_bytes=peak))


def test_step_targets_pick_their_rows_and_name_the_batch():
    """The targets divide our rows by the same-network reference (not the --torch-dwconv one),
    name the measured batch, and the note divides our default row by the authors' network."""
    bench = load_benchmark()
    ours_torch_dwconv = _train_row('auto', 2, 0.5, 380, torch_dwconv=True)  # not "ours"
    rows = [_train_row('reference', 2, 1.2, 1000, torch_dwconv=True), ours_torch_dwconv,
            _train_row('reference', 2, 0.8, 900),
            _train_row('auto', 2, 0.36, 360),
            _train_row('auto', 2, 0.24, 700, lean=False), ours_torch_dwconv]
    out = {t['key']: t for t in bench.evaluate_targets(None, dict(configs=rows), 'cpu')}
    assert out['train_time_ratio']['value'] == 0.36 / 0.8
    assert out['train_time_ratio']['status'] == 'PASS'
    assert out['train_mem_ratio']['value'] == 360 / 900
    assert out['train_time_ratio']['worst'] == 't-det train b2'
    assert out['train_mem_ratio_keep_all']['status'] == 'FAIL'  # 700 / 900
    note = out['train_vs_authors']
    assert note['status'] == 'INFO' and note['value'] == 0.36 / 1.2 and note['memory'] == 0.36


def test_dense_batch_reaches_the_model_rows():
    bench = load_benchmark()
    configs = bench.model_configs(['t'], ['det', 'cls'], False, 4, ('train',), (), True, 2)
    assert {c.batch for c in configs if c.task == 'det'} == {2}
    assert {c.batch for c in configs if c.task == 'cls'} == {4}
    assert {c.impl for c in configs if c.torch_dwconv} == {'reference', 'auto'}


def test_compiled_rows_warm_up_and_stay_out_of_the_default_targets(monkeypatch):
    """--compile adds our default rows compiled; they compile in their first steps, so both
    passes warm them up (3 steps) before measuring, and the step targets keep dividing the eager
    rows, reporting the compiled ones on lines of their own."""
    bench = load_benchmark()
    steps = []
    monkeypatch.setattr(bench, 'malloc_reuse', _recording_reuse(dict(reuse=False)))
    monkeypatch.setattr(bench, 'model_step',
                        lambda cfg, device: lambda: steps.append(cfg.name))
    args = bench.parse_args(['--models', '--modes', 'train', '--compile', 'reduce-overhead',
                             '--model-repeat', '1', '--device', 'cpu'])
    report = bench.run_models(args, bench.torch.device('cpu'))
    compiled = [c for c in report['configs'] if c['compile_mode']]
    assert [c['compile_mode'] for c in compiled] == ['reduce-overhead']

    def name(row):
        return bench.ModelConfig(**{k: v for k, v in row.items() if k != 'results'}).name

    assert 'compiled=reduce-overhead' in name(compiled[0])
    # peak pass: 3 warm-up steps + 1 metered; timed pass: 3 warm-up + 1 timed
    assert steps.count(name(compiled[0])) == 8
    eager = [c for c in report['configs'] if not c['compile_mode']]
    assert all(steps.count(name(c)) == 2 for c in eager)

    rows = [_train_row('reference', 1, 1.0, 1000), _train_row('auto', 1, 0.6, 400),
            dict(_train_row('auto', 1, 0.3, 450), compile_mode='reduce-overhead')]
    out = {t['key']: t for t in bench.evaluate_targets(None, dict(configs=rows), 'cpu')}
    assert out['train_time_ratio']['value'] == 0.6  # the eager row, not the compiled one
    assert out['train_time_ratio_compiled_reduce-overhead']['value'] == 0.3


@pytest.mark.parametrize('argv,message', [
    (['--cp-stages', '110'], '--cp-stages 110: give 4 digits 0/1'),
    (['--cp-stages', '1100', '11x0'], '--cp-stages 11x0: give 4 digits 0/1'),
    (['--impls', 'cpu', 'trition'], '--impls trition: not an implementation; valid: '),
])
def test_bad_flags_fail_before_any_measurement(argv, message, capsys):
    bench = load_benchmark()
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err
