"""Check a config's dataset paths before a run builds anything.

Without this, a missing COCO / ADE20K / ImageNet folder surfaces minutes into a run (after the
model is built) as a bare ``FileNotFoundError`` from deep inside the dataset class, with no word
on which config key to change. :func:`check_data_paths` reads the paths the way mmengine's
``BaseDataset`` resolves them (``ann_file`` and every ``data_prefix`` entry joined to
``data_root`` unless absolute) and raises one error that lists every missing path with the
``--cfg-options`` that would point the run elsewhere.

Only local paths are checked: a dataset whose ``data_root`` is a URI (``s3://...``) or that reads
through a non-local ``backend_args`` backend is left to its backend.

Two places run it: ``tools/train.py`` / ``tools/test.py`` before anything is built, and
:class:`DataCheckRunner` -- the ``runner_type`` of our configs -- before ``train()`` / ``val()``
/ ``test()`` build their loops, so that ``mim train`` / ``mim test`` and the libraries' own
scripts, which never run our tools, check too -- those that build the runner from
``runner_type``: all train scripts, mmdet's and mmpretrain's test scripts (mmseg 1.2.2's
``tools/test.py`` builds a plain ``Runner``). ``data_check = False`` in a config turns the
runner's check off; our tools, having checked already, set ``paths_checked`` on the runner.
"""
import os
import os.path as osp
from typing import Iterator, List, Tuple

from mmengine.registry import RUNNERS
from mmengine.runner import Runner

#: which loaders (and their evaluators) a command reads
LOADERS = {
    'train': (('train_dataloader', None), ('val_dataloader', 'val_evaluator')),
    'val': (('val_dataloader', 'val_evaluator'),),
    'test': (('test_dataloader', 'test_evaluator'),),
}
#: how to skip the check, by where it runs
SKIP_TOOL = '--skip-data-check'
SKIP_CONFIG = '--cfg-options data_check=False'


def _is_remote(path: str, backend_args) -> bool:
    backend = (backend_args or {}).get('backend', 'local')
    return '://' in path or backend != 'local'


def _leaf_datasets(ds, key: str) -> Iterator[Tuple[str, dict]]:
    """(config key, dataset dict) of every dataset that reads files, through wrappers such as
    ``RepeatDataset`` / ``ClassBalancedDataset`` (``dataset``) and ``ConcatDataset``
    (``datasets``)."""
    if not isinstance(ds, dict):
        return
    if isinstance(ds.get('dataset'), dict):
        yield from _leaf_datasets(ds['dataset'], f'{key}.dataset')
    elif isinstance(ds.get('datasets'), (list, tuple)):
        for i, sub in enumerate(ds['datasets']):
            yield from _leaf_datasets(sub, f'{key}.datasets.{i}')
    else:
        yield key, ds


def _dataset_paths(key: str, ds: dict) -> List[Tuple[str, str, str]]:
    """(what, config key to set, resolved path) for the paths ``ds`` reads, most basic first."""
    root = ds.get('data_root') or ''
    if _is_remote(str(root), ds.get('backend_args')):
        return []
    paths = []
    if root:
        paths.append(('data_root', f'{key}.data_root', root))
    ann = ds.get('ann_file')
    if isinstance(ann, str) and ann:
        paths.append(('ann_file', f'{key}.ann_file', ann if osp.isabs(ann) else
                      osp.join(root, ann)))
    prefix = ds.get('data_prefix')
    if isinstance(prefix, str):
        prefix = {'': prefix}
    elif not prefix and ds.get('split'):
        # mmpretrain's ImageNet reads images from data_root/<split> when data_prefix is empty
        prefix = {'': ds['split']}
    for name, p in (prefix or {}).items():
        if isinstance(p, str) and p:
            sub = f'{key}.data_prefix' + (f'.{name}' if name else '')
            paths.append((f'data_prefix{"." + name if name else ""}', sub,
                          p if osp.isabs(p) else osp.join(root, p)))
    return paths


def _evaluator_paths(key: str, evaluator) -> List[Tuple[str, str, str]]:
    metrics = evaluator if isinstance(evaluator, (list, tuple)) else [evaluator]
    paths = []
    for i, m in enumerate(metrics):
        ann = m.get('ann_file') if isinstance(m, dict) else None
        if isinstance(ann, str) and ann and not _is_remote(ann, m.get('backend_args')):
            sub = key if len(metrics) == 1 else f'{key}.{i}'
            paths.append(('ann_file', f'{sub}.ann_file', ann))
    return paths


def missing_data_paths(cfg, command: str) -> List[Tuple[str, str, str, str]]:
    """(owner, what, config key, path) of every local dataset path that ``command`` (``'train'``,
    ``'val'`` or ``'test'``) would read and that does not exist. Under a missing ``data_root``
    the paths inside it are not listed again."""
    missing = []
    for loader_key, evaluator_key in LOADERS[command]:
        loader = cfg.get(loader_key)
        if not loader:
            continue
        if command == 'train' and loader_key == 'val_dataloader' and cfg.get('val_cfg') is None:
            continue  # mmengine builds a validation loop whenever val_cfg is not None
        for key, ds in _leaf_datasets(loader.get('dataset'), f'{loader_key}.dataset'):
            for what, opt, path in _dataset_paths(key, ds):
                if not osp.exists(path):
                    missing.append((key, what, opt, path))
                    if what == 'data_root':
                        break
        if evaluator_key and cfg.get(evaluator_key):
            for what, opt, path in _evaluator_paths(evaluator_key, cfg.get(evaluator_key)):
                if not osp.exists(path):
                    missing.append((evaluator_key, what, opt, path))
    return missing


def check_data_paths(cfg, command: str, skip: str = SKIP_TOOL) -> None:
    """Raise ``FileNotFoundError`` naming every missing dataset path of ``command`` and the
    ``--cfg-options`` that set them; return quietly when all exist. ``skip`` is how the message
    says to turn the check off."""
    missing = missing_data_paths(cfg, command)
    if not missing:
        return
    lines = [f'  {owner}: {what} {path!r} does not exist' for owner, what, _, path in missing]
    options = ' '.join(f'{opt}={_placeholder(what, path)}' for _, what, opt, path in missing)
    raise FileNotFoundError(
        'dataset files not found (relative paths are taken from the working directory '
        f'{os.getcwd()}):\n' + '\n'.join(lines) + '\n'
        'Fix: put the dataset there (each library\'s standard layout: README.md, "Train and '
        'test"), run from the folder that holds it, or point the config at it, e.g.\n'
        '  --cfg-options ' + options +
        f'\n({skip} skips this check, e.g. for a dataset class that finds its files itself).')


def _placeholder(what: str, path: str) -> str:
    name = osp.basename(osp.normpath(path)) or path
    return f'/path/to/{name}' + ('/' if what != 'ann_file' else '')


@RUNNERS.register_module()
class DataCheckRunner(Runner):
    """mmengine's ``Runner`` that checks the dataset paths of ``train()`` / ``val()`` /
    ``test()`` (:func:`check_data_paths`) before they build their loops, unless the config says
    ``data_check = False``. Our configs select it with ``runner_type``, so every entry point that
    builds the runner from the config (``RUNNERS.build``) checks (module docstring: which)."""

    #: True where the caller has checked the paths itself (tools/train.py, tools/test.py): not
    #: a config key, so that a config dumped into the work dir keeps checking when reused
    paths_checked = False

    def _check_data(self, command: str) -> None:
        if not self.paths_checked and self.cfg.get('data_check', True):
            check_data_paths(self.cfg, command, skip=SKIP_CONFIG)

    def train(self):
        self._check_data('train')
        return super().train()

    def val(self):
        self._check_data('val')
        return super().val()

    def test(self):
        self._check_data('test')
        return super().test()
