"""tools/analysis/tune_triton.py: its choice rule, and one run end to end in Triton's interpreter
(CPU, tiny map: wall-clock times, so only the mechanics are checked, not which tile wins)."""
import json

import pytest

pytest.importorskip('triton')

from overlock_mm.ops import na2d_triton as nt  # noqa: E402
from tool_utils import load_tool  # noqa: E402


@pytest.fixture(scope='module')
def tune():
    return load_tool('tools/analysis/tune_triton.py', 'olk_tune_triton')


def test_choose_takes_smallest_geomean_and_skips_failures(tune):
    a, b, c = (dict(BLOCK_J=j, BLOCK_D=16, num_warps=1, num_stages=3) for j in (8, 16, 32))
    report = dict(cases=['x', 'y'], results={'forward': [
        # relative to the best per case: a (1, 4) -> 2.0; b (2, 1) -> 1.41; c fastest but failed
        dict(tile=a, times={'x': 1.0, 'y': 4.0}, errors={}),
        dict(tile=b, times={'x': 2.0, 'y': 1.0}, errors={}),
        dict(tile=c, times={'x': 0.5}, errors={'y': 'max |error| 1e-2 > 1e-4'}),
    ]})
    assert tune.choose(report) == {'forward': b}
    scores = {r['tile']['BLOCK_J']: r.get('score') for r in report['results']['forward']}
    assert scores[8] == pytest.approx(2.0) and scores[16] == pytest.approx(2 ** 0.5)
    assert scores[32] is None


def test_candidates_are_valid_tiles(tune):
    for kernel, default in nt.TILES.items():
        cands = tune.candidates(kernel)
        assert default in cands, kernel  # the shipped tile is among those measured
        assert all(set(c) == set(default) for c in cands)


def test_runs_in_interpreter_and_writes_a_tiles_file(tune, monkeypatch, tmp_path):
    from test_ops_triton import _interpreter_runs_runtime_loops
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    if not _interpreter_runs_runtime_loops():
        pytest.skip('this triton interpreter cannot loop over a runtime bound '
                    '(see test_ops_triton)')
    monkeypatch.delenv(nt.TILES_ENV, raising=False)
    monkeypatch.setattr(tune, '_CANDIDATES', {
        'forward': [(16, 16, 1, 3), (8, 8, 2, 1)], 'grad_attn': [(16, 1, 3), (8, 2, 3)],
        'grad_value': [(8, 16, 1, 1), (4, 8, 2, 3)]})
    out = tmp_path / 'tiles.json'
    report = tune.main(['--shape', '5', '1', '1', '10', '6', '9', '--repeat', '1',
                        '--out', str(out)])
    written = json.loads(out.read_text())
    assert set(written) == {'forward', 'grad_attn', 'grad_value'}
    for kernel, rows in report['results'].items():
        assert all(not r['errors'] for r in rows), rows  # every tile matched 'native'
        assert written[kernel] in [r['tile'] for r in rows]
    monkeypatch.setenv(nt.TILES_ENV, str(out))
    assert nt.tiles('grad_attn') == written['grad_attn']
