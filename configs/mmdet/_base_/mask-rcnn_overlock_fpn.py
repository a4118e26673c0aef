# Mask R-CNN + FPN with an OverLoCK backbone in the released detection layout.
_base_ = ['mmdet::_base_/models/mask-rcnn_r50_fpn.py', 'mmdet::_base_/default_runtime.py',
          './overlock_runtime.py']
model = dict(
    backbone=dict(
        _delete_=True,
        type='OverLoCK',
        arch='t',
        layout='det',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2),
    # The dense pyramid: C0, C1, C2 + C3/4, C3 + C3/4 (T: 64, 128, 384, 640).
    neck=dict(in_channels=[64, 128, 384, 640]))
