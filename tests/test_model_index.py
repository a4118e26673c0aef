"""Model-zoo metadata: model-index.yml + configs/*/metafile.yml, docs/model_zoo.md, README.

One consistent table: every config is listed once; metrics equal the targets stated in the
config headers; weight URLs are the ones built from the single release URL pattern
(overlock_mm.utils.convert.released_url) and the ones the config headers name; the generated
doc (and any copy of its tables in README.md) is up to date.
"""
import ast
import re
import sys
from pathlib import Path

import pytest
import yaml

from overlock_mm.utils.convert import RELEASE_URL, released_url

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))
import gen_model_zoo as zoo  # noqa: E402

MODELS = zoo.load_models(ROOT)
BY_CONFIG = {m['Config']: m for m in MODELS}


#: the model-zoo config folders (configs/demo etc. hold CPU demos, not zoo entries).
ZOO_DIRS = ('mmpretrain', 'mmdet', 'mmseg')


def all_configs():
    """Every OverLoCK config of the zoo folders (baseline backbones' configs are not ours to
    list: their weights and numbers belong to other projects)."""
    return sorted(p for d in ZOO_DIRS for p in (ROOT / 'configs' / d).rglob('*.py')
                  if '_base_' not in p.parts and 'overlock' in p.name)


def alias_target(path: Path):
    """The config a pure alias file (only ``_base_ = './x.py'``) points to, else None."""
    body = [n for n in ast.parse(path.read_text()).body if not isinstance(n, ast.Expr)]
    if len(body) == 1 and isinstance(body[0], ast.Assign) and \
            getattr(body[0].targets[0], 'id', None) == '_base_' and \
            isinstance(body[0].value, ast.Constant):
        return (path.parent / body[0].value.value).resolve()
    return None


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def test_model_index_loads_with_modelindex():
    """The format mim / modelindex read."""
    modelindex = pytest.importorskip('modelindex')
    mi = modelindex.load(str(ROOT / 'model-index.yml'))
    assert [m.name for m in mi.models] == [m['Name'] for m in MODELS]
    for m in mi.models:
        assert m.in_collection in {c.name for c in mi.collections}


def test_every_config_listed_once():
    names = [m['Name'] for m in MODELS]
    assert len(names) == len(set(names))
    assert len(BY_CONFIG) == len(MODELS)
    for m in MODELS:
        path = ROOT / m['Config']
        assert path.exists(), m['Config']
        assert Path(m['Config']).stem == m['Name']
    listed = set(BY_CONFIG)
    for path in all_configs():
        target = alias_target(path)
        if target is not None:  # short names (cascade_overlock_t.py) point to a listed config
            assert rel(target) in listed, rel(path)
        else:
            assert rel(path) in listed, f'{rel(path)} is not in any metafile'


def header(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith('#'):
            break
        lines.append(line[1:].strip())
    return ' '.join(lines)


def _arch(name):
    return re.search(r'overlock-(xt|t|s|b)[_-]', name).group(1)


def expected_weights(m):
    name, arch = m['Name'], _arch(m['Name'])
    if name.startswith('overlock-'):
        return released_url('cls_reparam' if name.endswith('_deploy') else 'cls', arch)
    if name.startswith('mask-rcnn'):
        return released_url('det', arch, '3x' if 'ms-crop-3x' in name else '1x')
    if name.startswith('upernet'):
        return released_url('seg', arch)
    return None  # Cascade Mask R-CNN: nothing released


@pytest.mark.parametrize('m', MODELS, ids=lambda m: m['Name'])
def test_weights_and_metrics_match_configs(m):
    text = header(ROOT / m['Config'])
    assert m.get('Weights') == expected_weights(m)
    metrics = {}
    for r in m.get('Results') or []:
        metrics.update(r['Metrics'])
    if m.get('Weights'):
        assert m['Weights'].startswith(RELEASE_URL)
        assert f'Released weights: {m["Weights"]}' in text
        assert m['Converted From']['Weights'] == m['Weights']
    elif not metrics:
        assert 'none published' in text
    if 'box AP' in metrics and 'mask AP' not in metrics:  # a single published number
        assert float(re.search(r'Target[^:]*: (\d+\.\d) box AP', text).group(1)) == \
            metrics['box AP']
        return
    if 'Top 1 Accuracy' in metrics:
        assert re.search(r'Target[^:]*: (\d+\.\d) top-1', text).group(1) == \
            str(metrics['Top 1 Accuracy'])
    if 'box AP' in metrics:
        box, mask = re.search(r'Target[^:]*: (\d+\.\d) / (\d+\.\d)', text).groups()
        assert (float(box), float(mask)) == (metrics['box AP'], metrics['mask AP'])
    if 'mIoU' in metrics:
        assert float(re.search(r'Target[^:]*: (\d+\.\d) mIoU', text).group(1)) == metrics['mIoU']


def test_deploy_configs():
    """Each *_deploy.py config is its training config with a re-parameterised backbone, listed
    with the re-parameterised weights and the same accuracy."""
    deploy = [m for m in MODELS if m['Name'].endswith('_deploy')]
    assert len(deploy) == 4
    for m in deploy:
        path = ROOT / m['Config']
        tree = ast.parse(path.read_text())
        assigns = {n.targets[0].id: n.value for n in tree.body if isinstance(n, ast.Assign)}
        base = (path.parent / ast.literal_eval(assigns['_base_'])).resolve()
        train = BY_CONFIG[rel(base)]
        assert 'deploy=True' in ast.unparse(assigns['model'])
        assert m['Results'] == train['Results']
        assert m['Metadata']['Re-parameterized'] and not train['Metadata']['Re-parameterized']
        assert m['Metadata']['Parameters'] < train['Metadata']['Parameters']


def test_param_counts_match_the_paper():
    """Metafile parameter counts (exact) round to docs/spec/ARCHITECTURE.md's figures."""
    paper = {'xt': (16.97, 16.45), 't': (34.48, 33.47), 's': (57.80, 56.16), 'b': (97.43, 94.94)}
    for m in MODELS:
        if m['Name'].startswith('overlock-'):
            deploy = m['Name'].endswith('_deploy')
            assert round(m['Metadata']['Parameters'] / 1e6, 2) == paper[_arch(m['Name'])][deploy]


def test_doc_is_generated_from_metadata():
    doc = (ROOT / 'docs' / 'model_zoo.md').read_text()
    assert doc == zoo.render(ROOT), 'run: python tools/gen_model_zoo.py'
    # every model appears in the doc's tables with its metrics and weights
    block = zoo.extract_tables(doc)
    for m in MODELS:
        row = next(ln for ln in block.splitlines() if f'({"../" + m["Config"]})' in ln)
        for r in m.get('Results') or []:
            for v in r['Metrics'].values():
                assert f'| {v:.1f} |' in row
        if m.get('Weights'):
            assert m['Weights'] in row


def test_readme_agrees_with_metadata():
    """README.md (the lead's): an embedded copy of the tables must be current, and any other
    row naming one of our configs or release URLs must carry the metafile's numbers."""
    readme = (ROOT / 'README.md').read_text()
    block = zoo.extract_tables(readme)
    embedded = block is not None and block.strip() != f'{zoo.BEGIN}\n{zoo.END}'
    if embedded:
        assert block == zoo.tables(MODELS, doc_dir='.'), \
            'README tables are stale: run python tools/gen_model_zoo.py --readme'
    if block is not None:
        readme = readme.replace(block, '')
    for line in readme.splitlines():
        for url in re.findall(re.escape(RELEASE_URL) + r'[\w.\-]+', line):
            assert url in {m.get('Weights') for m in MODELS}, f'unknown release URL {url}'
        if not line.startswith('|'):
            continue
        for m in MODELS:
            if m['Config'] in line or f'/{m["Name"]}.py' in line:
                for r in m.get('Results') or []:
                    for v in r['Metrics'].values():
                        assert str(v) in line, f'README row for {m["Name"]} lacks {v}: {line}'
    if block is not None and not embedded:
        pytest.skip("README.md's model-zoo block is empty: run python tools/gen_model_zoo.py "
                    '--readme (the rest of README.md agrees with the metadata)')


def test_metafiles_are_plain_yaml():
    for rel_path in yaml.safe_load((ROOT / 'model-index.yml').read_text())['Import']:
        data = yaml.safe_load((ROOT / rel_path).read_text())
        assert set(data) == {'Collections', 'Models'}
