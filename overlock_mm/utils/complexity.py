"""FLOP counting for OverLoCK with mmengine's analysis (fvcore-style jit tracing).

mmengine counts convolutions, matmuls and einsums out of the box but not our ContMix
aggregation (a custom autograd function, traced as ``prim::PythonOp``). The handles below count
multiply-accumulates (MACs, what OpenMMLab tables call FLOPs):

* aggregation ``na2d_av``: ``B * G * D * H * W * k^2`` per call (every output channel of every
  pixel sums k^2 products);
* the query-key affinity (an einsum): the product of all distinct index sizes;
* matmuls with broadcasting batch dims (the ``weight_proj`` 1x1 conv runs as a matmul; mmengine's
  default matmul handle ignores broadcast batch dims), or as a linear map (mmengine's handle)
  where ContMix writes its kernels pixel-major.
"""
from collections import Counter
from typing import Dict

import numpy as np
import torch
from mmengine.analysis import FlopAnalyzer
from mmengine.analysis.jit_handles import get_shape

#: operator name in the trace -> breakdown category (plus ``PythonOp.<name>`` -> 'aggregation'
#: for every name in ``ops.neighborhood.AV_FUNCTION_NAMES``: see :func:`_categories`)
CATEGORIES = {
    'conv': 'convolutions',  # mmengine's name for aten::_convolution
    'matmul': 'convolutions',  # ContMix weight_proj (a 1x1 conv in the release) as a matmul
    'linear': 'convolutions',  # the same, where the kernels are made pixel-major (CPU kernel)
    'einsum': 'affinity',
}
REFERENCE_CATEGORIES = ('convolutions', 'aggregation', 'affinity')


def _aggregation_handle(inputs, outputs):
    attn = get_shape(inputs[0])  # [B, G, k*k, H, W]
    value = get_shape(inputs[1])  # [B, G, D, H, W]
    return int(np.prod(value)) * attn[2]


def _einsum_handle(inputs, outputs):
    equation = inputs[0].toIValue().replace(' ', '')
    operands = inputs[1].node().inputs()
    shapes = [get_shape(v) for v in operands]
    lhs = equation.split('->')[0].split(',')
    sizes = {}
    for letters, shape in zip(lhs, shapes):
        sizes.update(zip(letters, shape))
    return int(np.prod(list(sizes.values())))


def _matmul_handle(inputs, outputs):
    a, b = (get_shape(v) for v in inputs[:2])
    out = get_shape(outputs[0])
    return int(np.prod(out)) * a[-1]


HANDLES = {
    'aten::einsum': _einsum_handle,
    'aten::matmul': _matmul_handle,
}


def _av_functions():
    """The aggregation's autograd functions as traced (``'native'``, ``'cpu'``, ``'triton'``)."""
    from ..ops.neighborhood import AV_FUNCTION_NAMES
    return [f'PythonOp.{name}' for name in AV_FUNCTION_NAMES]


def _handles() -> Dict[str, object]:
    return {**HANDLES, **{f'prim::{op}': _aggregation_handle for op in _av_functions()}}


def _categories() -> Dict[str, str]:
    return {**CATEGORIES, **{op: 'aggregation' for op in _av_functions()}}


def flop_breakdown(model: torch.nn.Module, inputs) -> Dict[str, int]:
    """MACs per category (``convolutions``, ``aggregation``, ``affinity``, ``other``)."""
    analyzer = FlopAnalyzer(model, inputs).set_op_handle(**_handles())
    analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_operator = analyzer.by_operator()  # runs the trace; unsupported_ops() needs it first
    unsupported = [k for k in analyzer.unsupported_ops() if k.startswith('prim::PythonOp')]
    if unsupported:
        raise RuntimeError(f'uncounted custom ops in the trace: {unsupported}; build an '
                           'aggregation with ops.neighborhood.lean_av_function (counted '
                           'automatically) or add a handle in overlock_mm/utils/complexity.py.')
    categories = _categories()
    counts = Counter()
    for op, n in by_operator.items():
        counts[categories.get(op, 'other')] += n
    counts['total'] = sum(counts[c] for c in REFERENCE_CATEGORIES)
    return dict(counts)
