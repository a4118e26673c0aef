"""Custom operators. ``na2d_av`` is ContMix's neighbourhood aggregation."""
from .neighborhood import (available_impls, na2d_av, na2d_av_reference, register_impl,
                           relative_position_index, window_start)

__all__ = ['na2d_av', 'na2d_av_reference', 'available_impls', 'register_impl',
           'relative_position_index', 'window_start']
