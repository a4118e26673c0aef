from .checkpoint import (CheckpointError, extract_state_dict, load_backbone_weights,
                         read_checkpoint, reparameterize_state_dict, strip_prefix)

__all__ = ['CheckpointError', 'extract_state_dict', 'load_backbone_weights', 'read_checkpoint',
           'reparameterize_state_dict', 'strip_prefix']
