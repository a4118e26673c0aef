from .moganet import MogaNet
from .overlock import OverLoCK
from .unireplknet import UniRepLKNet

__all__ = ['OverLoCK', 'MogaNet', 'UniRepLKNet']
