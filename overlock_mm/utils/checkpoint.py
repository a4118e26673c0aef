"""Reading checkpoints safely and mapping them onto OverLoCK modules.

* Files are read with ``torch.load(weights_only=True)``: tensors and plain containers only. A
  file that needs arbitrary pickled objects (code) is refused with an explanation.
* Released layouts are recognised and converted at load time (timm's ``checkpoint_filter_fn``
  idea): plain classification state dicts, ``{'model': ...}``/``{'state_dict': ...}`` wrappers,
  mmdet/mmseg checkpoints (``backbone.`` prefix), and training-form weights loaded into a
  re-parameterised (``deploy=True``) model are fused on the fly.
"""
import pickle
import re
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..layers.reparam import BN_FIELDS, merge_branches

#: keys of the released classification layout that belong to the classifier head.
HEAD_PREFIXES = ('head.', 'aux_head.')
#: modules that exist only in the dense layouts (newly initialised when loading ImageNet weights).
DENSE_ONLY_PREFIXES = ('extra_norm.', 'h_proj.')
_DIL_RE = re.compile(r'^(?P<p>.*)\.dil_conv_k(?P<k>\d+)_(?P<r>\d+)\.weight$')


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the reason and the fix in the message."""


def read_checkpoint(filename: str, map_location='cpu') -> dict:
    """Load a local file or URL with ``weights_only=True``."""
    try:
        if re.match(r'^(https?|s3)://', str(filename)):
            return torch.hub.load_state_dict_from_url(filename, map_location=map_location,
                                                      weights_only=True, check_hash=False)
        return torch.load(filename, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f'checkpoint {filename!r} does not exist; check the path '
                              '(or download the released weights first).') from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f'refusing to load {filename!r}: it contains pickled objects that are not plain '
            f'tensors/containers, and loading them could execute code ({str(e).splitlines()[0]}). '
            'If you trust the file, convert it once in a separate, trusted session with '
            'torch.load(weights_only=False) and save only its state_dict.') from None
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
        kernel, bias = merge_branches(sd[f'{p}.lk_origin.weight'].double(), bn(f'{p}.origin_bn'), parts)
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
    mismatched = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
                  for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise CheckpointError(f'{filename!r} does not fit this OverLoCK (arch {model.arch}): '
                              f'{len(mismatched)} shape mismatches, e.g. {mismatched[0]}. '
                              'Is the arch (xt/t/s/b) right?')
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
