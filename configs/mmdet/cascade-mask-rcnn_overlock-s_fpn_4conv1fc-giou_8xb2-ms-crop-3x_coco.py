# Cascade Mask R-CNN, OverLoCK-S, FPN, 4conv1fc GIoU heads, MS 3x + crop, COCO.
# 8 GPUs x 2 images. Target: 53.6 box AP (the paper: OverLoCK-S is 1.0 AP above MogaNet-B's 52.6, MS 3x, GIoU heads).
_base_ = ['./_base_/cascade-mask-rcnn_overlock_fpn.py', './_base_/ms-crop-3x.py']
model = dict(
    backbone=dict(arch='s', drop_path_rate=0.4,
                  init_cfg=dict(type='Pretrained', checkpoint='https://github.com/LMMMEng/OverLoCK/releases/download/v1/overlock_s_in1k_224.pth')),
    neck=dict(in_channels=[64, 128, 448, 640]))
optim_wrapper = dict(optimizer=dict(lr=2e-4))
