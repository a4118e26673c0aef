from .blocks import DynamicConvBlock, RepConvBlock
from .contmix import contmix_aggregate, contmix_kernels, relative_position_bias
from .conv import ResDWConv, SEModule, conv_bn
from .norm import GRN, BatchNorm2d, LayerNorm2d, LayerScale
from .reparam import DILATED_BRANCHES, DilatedReparamBlock

__all__ = ['DynamicConvBlock', 'RepConvBlock', 'contmix_aggregate', 'contmix_kernels',
           'relative_position_bias', 'ResDWConv', 'SEModule', 'conv_bn', 'GRN', 'BatchNorm2d',
           'LayerNorm2d', 'LayerScale', 'DILATED_BRANCHES', 'DilatedReparamBlock']
