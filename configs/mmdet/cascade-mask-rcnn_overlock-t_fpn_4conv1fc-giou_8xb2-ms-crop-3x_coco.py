# Cascade Mask R-CNN, OverLoCK-T, FPN, 4conv1fc GIoU heads, MS 3x + crop, COCO.
# 8 GPUs x 2 images. Target: none published (the paper reports Cascade results for S only).
_base_ = ['./_base_/cascade-mask-rcnn_overlock_fpn.py', './_base_/ms-crop-3x.py']
model = dict(
    backbone=dict(arch='t', drop_path_rate=0.2,
                  init_cfg=dict(type='Pretrained', checkpoint='https://github.com/LMMMEng/OverLoCK/releases/download/v1/overlock_t_in1k_224.pth')),
    neck=dict(in_channels=[64, 128, 384, 640]))
optim_wrapper = dict(optimizer=dict(lr=2e-4))
