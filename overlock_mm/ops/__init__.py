"""Custom operators. ``na2d_av`` is ContMix's neighbourhood aggregation; ``depthwise_conv2d``
the large-kernel depthwise convolution with a faster CPU path; ``grn`` Global Response
Normalisation with a leaner backward."""
from .dwconv import depthwise_conv2d
from .grn import grn
from .neighborhood import (auto_impl, available_impls, is_pixel_major, known_impls, na2d_av,
                           na2d_av_reference, prefers_pixel_major, register_impl,
                           relative_position_index, window_start)

__all__ = ['na2d_av', 'na2d_av_reference', 'available_impls', 'known_impls', 'auto_impl',
           'register_impl', 'is_pixel_major', 'prefers_pixel_major', 'depthwise_conv2d', 'grn',
           'relative_position_index', 'window_start']
