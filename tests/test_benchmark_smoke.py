"""The benchmark harness runs end to end (smallest settings) and reports what it measured.

Not a timing test: it asserts only on structure and on the numerical cross-check the harness
makes itself (every implementation's forward equals the reference within 1e-4)."""
import json

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
    dw = report['dwconv']['results'][0]
    # XT's depthwise convs at 224: the large 17x17 kernels of stride 4 are among them
    assert any(c['kernel'] == 17 for c in dw['cases'])
    assert all(c[k] > 0 for c in dw['cases']
               for k in ('fwd_torch', 'fwd_ours', 'fwdbwd_torch', 'fwdbwd_ours'))


def test_profile_step_prints_a_table():
    mod = load_tool('tools/analysis/profile_step.py', 'olk_profile_step')
    table = mod.main(['--variant', 'xt', '--task', 'cls', '--mode', 'train', '--warmup', '0',
                      '--rows', '5', '--device', 'cpu'])
    assert 'aten::' in table and 'Self CPU' in table


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
