from . import data_check  # noqa: F401 - registers DataCheckRunner (runner_type of our configs)
from .checkpoint import (CheckpointError, extract_state_dict, load_backbone_weights,
                         read_checkpoint, reparameterize_state_dict, strip_prefix)

__all__ = ['CheckpointError', 'extract_state_dict', 'load_backbone_weights', 'read_checkpoint',
           'reparameterize_state_dict', 'strip_prefix']
