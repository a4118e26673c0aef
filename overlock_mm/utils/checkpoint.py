"""Reading checkpoints safely and mapping them onto OverLoCK modules.

* Files are read with ``torch.load(weights_only=True)``: tensors and plain containers only. A
  file that needs arbitrary pickled objects (code) is refused with an explanation.
* Released layouts are recognised and converted at load time (timm's ``checkpoint_filter_fn``
  idea): plain classification state dicts, ``{'model': ...}``/``{'state_dict': ...}`` wrappers,
  mmdet/mmseg checkpoints (``backbone.`` prefix), and training-form weights loaded into a
  re-parameterised (``deploy=True``) model are fused on the fly.
"""
import io
import pickle
import re
from collections import OrderedDict
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..layers.reparam import BN_FIELDS, merge_branches

#: keys of the released classification layout that belong to the classifier head.
HEAD_PREFIXES = ('head.', 'aux_head.')
#: modules that exist only in the dense layouts (newly initialised when loading ImageNet weights).
DENSE_ONLY_PREFIXES = ('extra_norm.', 'h_proj.')
_DIL_RE = re.compile(r'^(?P<p>.*)\.dil_conv_k(?P<k>\d+)_(?P<r>\d+)\.weight$')
#: where UniRepLKNet keeps its dilated re-param blocks (``stages.<i>.<j>.dwconv.origin_bn.*``,
#: the release's key names): the same branch names as OverLoCK's, but its blocks fuse more
#: (block BN, GRN bias, layer scale), which only UniRepLKNet.switch_to_deploy does.
_UNIREP_BLOCK_RE = re.compile(r'(^|\.)stages\.\d+\.\d+\.dwconv$')
_URI_RE = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the reason and the fix in the message."""


def _unsafe_globals(filename) -> list:
    """The globals a file would need beyond the allow-list (found without unpickling them)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(filename)
    except Exception:  # pragma: no cover - legacy (non-zip) files, older torch
        return []


def _read_uri(uri: str) -> bytes:
    from mmengine.fileio import get
    try:
        return get(uri)
    except Exception as e:  # noqa: BLE001 - a missing backend package, credentials, a bad key
        raise CheckpointError(f'cannot read {uri!r} through mmengine.fileio ({type(e).__name__}: '
                              f'{e}); install and configure the backend this URI needs (e.g. '
                              'petrel_client for s3://), or download the file and pass its local '
                              'path.') from None


def read_checkpoint(filename: str, map_location='cpu') -> dict:
    """Load a local file or URL with ``torch.load(weights_only=True)``.

    Only tensors, plain containers/scalars/strings and the allow-listed mmengine/numpy types
    (:mod:`overlock_mm.utils.safe_load`) are accepted; nothing in the file is ever executed.

    ``http(s)://`` URLs go through ``torch.hub``'s download cache; other URIs (``s3://`` ...)
    through ``mmengine.fileio``'s backends.

    Raises:
        CheckpointError: missing, unreadable, or carrying pickled code/objects (refused).
    """
    from .safe_load import register_safe_globals
    register_safe_globals()
    name = str(filename)
    try:
        if re.match(r'^https?://', name):
            return torch.hub.load_state_dict_from_url(name, map_location=map_location,
                                                      weights_only=True, check_hash=False)
        if _URI_RE.match(name):  # s3://, petrel://...: mmengine's file backends read the bytes
            return torch.load(io.BytesIO(_read_uri(name)), map_location=map_location,
                              weights_only=True)
        return torch.load(filename, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f'checkpoint {filename!r} does not exist; check the path '
                              '(or download the released weights first).') from None
    except pickle.UnpicklingError as e:
        found = re.findall(r'GLOBAL (\S+) was not an allowed global', str(e))
        if not found and not _URI_RE.match(name):
            found = _unsafe_globals(filename)
        what = f' ({", ".join(found)})' if found else ''
        m = re.search(r'(Unsupported global: GLOBAL \S+ was not an allowed global by default|'
                      r'checkpoint asks for getattr\(.*?\);[^.]*|WeightsUnpickler error: [^.]*)',
                      str(e))
        reason = m.group(1) if m else str(e).splitlines()[0]
        raise CheckpointError(
            f'refusing to load {filename!r}: it contains pickled objects{what} that are not '
            'tensors or plain data, and unpickling them could execute code. Only '
            'weights_only=True loading is used (tensors, containers, numbers, strings and '
            f'mmengine\'s own checkpoint types). Unpickler: {reason}. If you trust the '
            'file, re-save only its state_dict in a separate, trusted session.') from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f'cannot read checkpoint {filename!r}: {e}. The file is corrupt, '
                              'truncated or not a PyTorch checkpoint; download it again.') from None


def extract_state_dict(ckpt) -> Dict[str, torch.Tensor]:
    """Unwrap the common checkpoint containers into a flat ``name -> tensor`` dict."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'expected a checkpoint dict, got {type(ckpt).__name__}.')
    for key in ('state_dict', 'model', 'module'):
        if key in ckpt and isinstance(ckpt[key], dict):
            ckpt = ckpt[key]
            break
    sd = OrderedDict()
    for k, v in ckpt.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f'checkpoint entry {k!r} is a {type(v).__name__}, not a tensor; '
                                  'this is not a state dict of a known layout.')
        sd[k[7:] if k.startswith('module.') else k] = v
    return sd


def strip_prefix(sd: Dict[str, torch.Tensor], prefix: Optional[str]) -> Dict[str, torch.Tensor]:
    """Keep the keys under ``prefix`` (e.g. ``'backbone.'``), without it."""
    if not prefix:
        return sd
    if not prefix.endswith('.'):
        prefix += '.'
    out = OrderedDict((k[len(prefix):], v) for k, v in sd.items() if k.startswith(prefix))
    if not out:
        raise CheckpointError(f"no key of the checkpoint starts with '{prefix}'.")
    return out


def reparameterize_state_dict(sd: Dict[str, torch.Tensor]) -> 'OrderedDict[str, torch.Tensor]':
    """Fuse every dilated re-param block of a state dict (any model: classifier, detector,
    segmentor) into its deploy form ``<p>.lk_origin.{weight,bias}``.

    Works on key names alone: block prefixes are found from ``<p>.origin_bn.*`` and the branches
    from ``<p>.dil_conv_k{k}_{r}`` (BatchNorm eps 1e-5, the PyTorch default the release uses).
    Arithmetic runs in float64 and is cast back.
    """
    blocks = {k[:-len('.origin_bn.weight')] for k in sd if k.endswith('.origin_bn.weight')}
    branches: Dict[str, list] = {p: [] for p in blocks}
    for k in sd:
        m = _DIL_RE.match(k)
        if m and m.group('p') in branches:
            branches[m.group('p')].append(m.group('p', 'k', 'r'))

    def bn(name):
        return {f: sd[f'{name}.{f}'].double() for f in BN_FIELDS}

    fused = {}
    for p in blocks:
        parts = [(int(r), sd[f'{p}.dil_conv_k{k}_{r}.weight'].double(), bn(f'{p}.dil_bn_k{k}_{r}'))
                 for _, k, r in branches[p]]
        dtype = sd[f'{p}.lk_origin.weight'].dtype
        kernel, bias = merge_branches(sd[f'{p}.lk_origin.weight'].double(),
                                      bn(f'{p}.origin_bn'), parts)
        fused[p] = (kernel.to(dtype), bias.to(dtype))
    out = OrderedDict()
    for k, v in sd.items():
        owner, _, rest = k.rpartition('.lk_origin.')
        if rest == 'weight' and owner in fused:
            out[k], out[f'{owner}.lk_origin.bias'] = fused[owner]
            continue
        if any(k.startswith(p + '.origin_bn.') or k.startswith(p + '.dil_') for p in blocks):
            continue
        out[k] = v
    return out


def is_reparameterized(sd: Dict[str, torch.Tensor]) -> bool:
    return any(k.endswith('.lk_origin.bias') for k in sd) and \
        not any(k.endswith('.origin_bn.weight') for k in sd)


def load_backbone_weights(model: nn.Module, filename: str, prefix: Optional[str] = None,
                          map_location='cpu', logger=None) -> Tuple[list, list]:
    """Load an OverLoCK checkpoint of any released layout into ``model`` (an OverLoCK backbone).

    Unused keys (classifier heads, detector necks...) and the dense-only modules that keep their
    fresh initialisation are reported; any other missing key or a shape mismatch is an error.

    Returns:
        (unused keys, newly initialised keys)
    """
    sd = extract_state_dict(read_checkpoint(filename, map_location))
    if prefix is None and any(k.startswith('backbone.') for k in sd):
        prefix = 'backbone.'  # an mmdet / mmseg / mmpretrain checkpoint
    sd = strip_prefix(sd, prefix)
    own = model.state_dict()
    ckpt_deploy = is_reparameterized(sd)
    model_deploy = any(k.endswith('.lk_origin.bias') for k in own)
    if model_deploy and not ckpt_deploy:
        sd = reparameterize_state_dict(sd)
    elif ckpt_deploy and not model_deploy:
        raise CheckpointError(f'{filename!r} holds re-parameterised (deploy) weights; build the '
                              'backbone with deploy=True to load it (training-form modules '
                              'cannot be recovered from fused kernels).')
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape))
                  for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        k, ckpt_shape, model_shape = mismatched[0]
        if len(mismatched) == 1 and k == 'patch_embed1.0.weight' and \
                ckpt_shape[0] == model_shape[0]:
            # only the stem's input channels differ
            hint = (f'the checkpoint takes {ckpt_shape[1]}-channel inputs: build the backbone '
                    f'with in_channels={ckpt_shape[1]}, or adapt that tensor yourself.')
        else:
            named = [n for n in type(model).arch_settings if model._parse_arch(n) == model.arch]
            hint = (f"is the arch right? This model is {named[0]!r}" if named else
                    'is the arch right? This model has a custom arch dict')
            hint += f" ({', '.join(repr(n) for n in type(model).arch_settings)} are released)."
        raise CheckpointError(f'{filename!r} does not fit this OverLoCK: {len(mismatched)} shape '
                              f'mismatches, e.g. {k}: checkpoint {ckpt_shape} vs model '
                              f'{model_shape}; {hint}')
    unused = [k for k in sd if k not in own]
    missing = [k for k in own if k not in sd]
    fresh = [k for k in missing if k.startswith(DENSE_ONLY_PREFIXES)]
    lost = [k for k in missing if k not in fresh]
    if lost:
        raise CheckpointError(f'{filename!r} lacks {len(lost)} backbone tensors, e.g. {lost[:3]}; '
                              'it is not an OverLoCK checkpoint of this arch/layout (pass prefix= '
                              "if its backbone keys sit under a prefix other than 'backbone.').")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    if logger is not None:
        logger.info(f'OverLoCK: loaded {len(sd) - len(unused)} tensors from {filename}.')
        if unused:
            groups = sorted({k.split('.')[0] for k in unused})
            logger.info(f'OverLoCK: {len(unused)} checkpoint tensors unused (modules: '
                        f'{", ".join(groups)}): not part of the backbone.')
        if fresh:
            groups = sorted({'.'.join(k.split('.')[:2]) for k in fresh})
            logger.info(f'OverLoCK: newly initialised (dense-layout modules absent from the '
                        f'checkpoint): {", ".join(groups)}.')
    return unused, fresh


# ------------------------------------------------------------------------- re-parameterisation
#: entries of an mmengine / timm checkpoint that describe training state; a deploy checkpoint
#: cannot resume training, so they are dropped.
TRAINING_STATE_KEYS = ('optimizer', 'optim_wrapper', 'param_schedulers', 'message_hub',
                       'ema_state_dict', 'state_dict_ema', 'scaler', 'amp', 'lr_scheduler')


def reparameterize_checkpoint(ckpt) -> Tuple[dict, int]:
    """The deploy form of any OverLoCK checkpoint (classifier, detector, segmentor; released or
    ours): every DilatedReparamBlock fused into one ``lk_origin`` conv with bias.

    A bare state dict stays bare (the released ``*_reparam.pth`` form). A wrapped one becomes
    mmengine's container: the weights under ``state_dict`` (also where they were under ``model``
    or ``module``, timm's and the authors' keys), its ``meta`` kept (``meta['deploy'] = True``),
    its training state dropped (:data:`TRAINING_STATE_KEYS`).

    Returns:
        (new checkpoint, number of fused blocks)
    """
    sd = extract_state_dict(ckpt)
    if is_reparameterized(sd):
        raise CheckpointError('the checkpoint is already re-parameterised (deploy form).')
    n_blocks = sum(1 for k in sd if k.endswith('.origin_bn.weight'))
    unirep = [k for k in sd if k.endswith('.origin_bn.weight')
              and _UNIREP_BLOCK_RE.search(k[:-len('.origin_bn.weight')])]
    if unirep:
        raise CheckpointError(
            f'{unirep[0][:-len(".origin_bn.weight")]} is a UniRepLKNet block: this converts '
            'OverLoCK checkpoints only. Load a UniRepLKNet checkpoint into UniRepLKNet(..., '
            'deploy=True) (it fuses while loading) or call switch_to_deploy() on the trained '
            'model, and save its state_dict.')
    if not n_blocks:
        raise CheckpointError('no DilatedReparamBlock (*.origin_bn.*, *.dil_conv_k*) found: '
                              'not a training-form OverLoCK checkpoint.')
    fused = reparameterize_state_dict(sd)
    wrapped = isinstance(ckpt, dict) and any(
        isinstance(ckpt.get(k), dict) for k in ('state_dict', 'model', 'module'))
    if not wrapped:
        return fused, n_blocks
    out = {}
    for k, v in ckpt.items():
        if k in TRAINING_STATE_KEYS:
            continue
        if k in ('state_dict', 'model', 'module') and isinstance(v, dict):
            out['state_dict'] = fused
        elif k == 'meta' and isinstance(v, dict):
            out['meta'] = dict(v, deploy=True)
        else:
            out[k] = v
    out.setdefault('meta', {'deploy': True})
    return out, n_blocks


def fuse_training_weights_pre_hook(module: nn.Module, state_dict: dict, prefix: str,
                                   *args) -> None:
    """``load_state_dict`` pre-hook of a backbone: training-form weights (``origin_bn``,
    ``dil_conv_k*``) arriving at a re-parameterised (``deploy``) model are fused in place, so any
    checkpoint loads into a deploy model by any route (``load_from``, ``init_cfg``, EMA copies).
    Re-parameterised weights arriving at a training-form model are refused."""
    def fuse(sub: 'OrderedDict[str, torch.Tensor]') -> 'OrderedDict[str, torch.Tensor]':
        if getattr(module, 'deploy', False):
            training_form = any(k.endswith('.origin_bn.weight') for k in sub)
            return reparameterize_state_dict(sub) if training_form else sub
        if is_reparameterized(sub):
            raise CheckpointError(
                'the checkpoint holds re-parameterised (deploy) OverLoCK weights but the model is '
                'in training form; build the backbone with deploy=True (e.g. --cfg-options '
                'model.backbone.deploy=True or a *_deploy.py config) to load it.')
        return sub

    rewrite_under_prefix(state_dict, prefix, fuse)


def rewrite_under_prefix(state_dict: dict, prefix: str, fn: Callable[[dict], dict]) -> None:
    """A backbone's ``load_state_dict`` pre-hook step: the entries under ``prefix`` (the
    backbone's own, e.g. ``'backbone.'`` in a detector) go through ``fn`` without the prefix,
    and a different dict it returns replaces them in place; ``fn`` returning its argument leaves
    them as they are. Nothing under the prefix: nothing to do."""
    own = [k for k in state_dict if k.startswith(prefix)]
    if not own:
        return
    sub = OrderedDict((k[len(prefix):], state_dict[k]) for k in own)
    new = fn(sub)
    if new is sub:
        return
    for k in own:
        del state_dict[k]
    state_dict.update((prefix + k, v) for k, v in new.items())


# ----------------------------------------------------------------- load_from=<released file>
def normalize_loaded_checkpoint(checkpoint: dict) -> bool:
    """Turn a bare released ImageNet state dict, as read by mmengine for ``load_from``, into an
    mmengine checkpoint *in place* (``{'meta': ..., 'state_dict': <mmpretrain keys>}``).

    mmengine hands the same dict to every hook's ``after_load_checkpoint`` and then to the model;
    hooks such as ``EMAHook`` expect ``checkpoint['state_dict']``. Returns whether it changed.
    """
    from .convert import convert_released, is_released_cls_layout
    if not isinstance(checkpoint, dict) or 'state_dict' in checkpoint:
        return False
    if not (checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values())
            and is_released_cls_layout(checkpoint)):
        return False
    new, _ = convert_released(dict(checkpoint), source='load_from')
    checkpoint.clear()
    checkpoint.update(new)
    return True


try:
    from mmengine.hooks import Hook
    from mmengine.registry import HOOKS

    @HOOKS.register_module()
    class ReleasedCheckpointHook(Hook):
        """Lets ``load_from=<released overlock_*_in1k_224.pth>`` work with every hook.

        Runs first (priority ``VERY_HIGH``) in ``after_load_checkpoint`` and wraps the bare
        released state dict into ``{'meta', 'state_dict'}`` with mmpretrain key names (see
        :func:`normalize_loaded_checkpoint`); other checkpoints pass through untouched.
        """
        priority = 'VERY_HIGH'

        def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
            if normalize_loaded_checkpoint(checkpoint):
                runner.logger.info('OverLoCK: converted the released ImageNet layout '
                                   '(head.*, aux_head.* -> head.head.*, head.aux_head.*).')
except ImportError:  # pragma: no cover - mmengine is a hard dependency
    pass
