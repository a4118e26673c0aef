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
