"""Constructor and input checks shared by the backbones (OverLoCK, MogaNet, UniRepLKNet).

Each raises with the backbone's name, what was given and what is valid, so a config typo reads
as what to fix rather than as a traceback from deep inside the model.
"""
import numbers
from typing import Mapping, Optional, Sequence, Tuple, Union

import torch


def select_arch(owner: str, arch: Union[str, dict], settings: Mapping[str, dict],
                aliases: Mapping[str, str], required: Sequence[str],
                optional: Sequence[str] = ()) -> dict:
    """The arch dict named by ``arch`` (a key of ``settings`` or of ``aliases``, any case), or
    ``arch`` itself, checked for missing and unknown keys.

    Returns a new dict whose list and tuple values are new lists: neither the caller's dict nor
    the class's ``settings`` can be changed through it. The per-field checks stay with each
    backbone.
    """
    if isinstance(arch, str):
        key = aliases.get(arch.lower(), arch.lower())
        if key not in settings:
            valid = sorted(settings) + sorted(aliases)
            extra = f" (and optionally {', '.join(optional)})" if optional else ''
            raise ValueError(f"{owner}: unknown arch '{arch}'; valid names: {', '.join(valid)}, "
                             f"or a dict with keys {', '.join(required)}{extra}.")
        arch = settings[key]
    elif not isinstance(arch, dict):
        raise TypeError(f'{owner}: arch must be a str or dict, got {type(arch).__name__}.')
    missing = [f for f in required if f not in arch]
    if missing:
        raise ValueError(f'{owner}: arch dict is missing {", ".join(missing)} '
                         f'(required keys: {", ".join(required)}).')
    unknown = sorted(set(arch) - set(required) - set(optional))
    if unknown:
        raise ValueError(f'{owner}: arch dict has unknown keys {", ".join(unknown)} '
                         f'(valid keys: {", ".join(tuple(required) + tuple(optional))}).')
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in arch.items()}


def is_int(x) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_number(x) -> bool:
    """A Python int or float, not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_out_indices(owner: str, out_indices, num: int, what: str) -> Tuple[int, ...]:
    """Normalise ``out_indices`` (int or sequence, negatives allowed) to sorted unique indices
    in ``range(num)``, or raise ValueError; ``what`` says what the indices select."""
    if is_int(out_indices):
        out_indices = (out_indices,)
    if not isinstance(out_indices, (list, tuple)) or not out_indices:
        raise ValueError(f'{owner}: out_indices must be an int or a non-empty sequence of '
                         f'ints, got {out_indices!r}.')
    for i in out_indices:
        if not is_int(i):
            raise ValueError(f'{owner}: out_indices {tuple(out_indices)} has {i!r} of type '
                             f'{type(i).__name__}; indices must be ints ({what}).')
        if not -num <= i < num:
            raise ValueError(f'{owner}: out_indices {tuple(out_indices)} has {i!r}; valid '
                             f'indices are 0-{num - 1} ({what}).')
    return tuple(sorted({int(i) % num for i in out_indices}))


def per_stage_flags(owner: str, name: str, flags: Union[bool, Sequence[bool]],
                    num_stages: int = 4) -> Tuple[bool, ...]:
    """``with_cp`` / ``memory_efficient`` as one flag per stage (stride 4, 8, 16, 32), from one
    flag or one per stage; anything else raises a ValueError naming ``owner`` and ``name``."""
    if isinstance(flags, bool):
        return (flags,) * num_stages
    flags = tuple(flags) if isinstance(flags, (list, tuple)) else (flags,)
    if len(flags) != num_stages or not all(isinstance(f, (bool, int)) and f in (0, 1)
                                           for f in flags):
        raise ValueError(f'{owner}: {name} must be a bool or {num_stages} bools (strides 4, 8, '
                         f'16, 32), got {flags}.')
    return tuple(bool(f) for f in flags)


def check_frozen_stages(owner: str, frozen_stages, parts: Sequence[str]) -> int:
    """``frozen_stages`` must be an int from -1 to ``len(parts)``; ``parts`` names what each
    stage freezes, in order, for the error message."""
    n = len(parts)
    if isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int) or \
            not -1 <= frozen_stages <= n:
        raise ValueError(f'{owner}: frozen_stages={frozen_stages!r} must be an int from -1 to '
                         f'{n}: -1 or 0 freezes nothing, n freezes the first n of '
                         f'[{"; ".join(parts)}].')
    return frozen_stages


def check_input(owner: str, x, in_channels: int) -> None:
    """``x`` must be an NCHW tensor with ``in_channels`` channels."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f'{owner} expects a torch.Tensor, got {type(x).__name__}.')
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f'{owner} expects an NCHW tensor with {in_channels} channels, got '
                         f'shape {tuple(x.shape)}.')


def pretrained_and_rest(owner: str, init_cfg) -> Tuple[list, Optional[object]]:
    """Split an ``init_cfg`` into its ``Pretrained`` entries and the rest (one dict, a list, or
    None), each ``Pretrained`` entry checked to name its ``checkpoint``."""
    cfgs = list(init_cfg) if isinstance(init_cfg, (list, tuple)) else \
        ([init_cfg] if init_cfg is not None else [])
    pretrained = [c for c in cfgs if c.get('type') == 'Pretrained']
    for c in pretrained:
        if not c.get('checkpoint'):
            raise ValueError(f"{owner}: init_cfg {dict(c)} has no checkpoint; use "
                             "init_cfg=dict(type='Pretrained', checkpoint=<path or URL>), or drop "
                             "it to start from the default initialisation.")
    rest = [c for c in cfgs if c.get('type') != 'Pretrained']
    return pretrained, (rest if len(rest) > 1 else (rest[0] if rest else None))
