from .overlock import OverLoCK

__all__ = ['OverLoCK']
