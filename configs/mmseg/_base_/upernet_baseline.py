# UperNet for the baseline backbones (MogaNet, UniRepLKNet), ADE20K 512x512, 160k iterations.
# Decode head, auxiliary FCN head (level 2), data and schedule are inherited from the OverLoCK
# segmentor, so a comparison differs in the backbone (and its optimiser recipe) alone. Both
# baselines' authors used this UperNet (channels 512, pool scales 1/2/3/6, aux loss 0.4).
_base_ = ['./upernet_overlock.py']
model = dict(backbone=dict(_delete_=True, type='MogaNet', arch='small', out_indices=(0, 1, 2, 3)))
