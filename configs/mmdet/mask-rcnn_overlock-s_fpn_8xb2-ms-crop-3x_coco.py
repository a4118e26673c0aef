# Mask R-CNN, OverLoCK-S, FPN, MS 3x + crop, COCO. 8 GPUs x 2 images.
# Target (authors' release, box AP / mask AP on val2017): 51.0 / 45.0.
# Released weights: https://github.com/LMMMEng/OverLoCK/releases/download/v1/maskrcnn3x_overlock_small_coco.pth
_base_ = ['./_base_/mask-rcnn_overlock_fpn.py', './_base_/ms-crop-3x.py']
model = dict(
    backbone=dict(arch='s', drop_path_rate=0.4,
                  init_cfg=dict(type='Pretrained', checkpoint='https://github.com/LMMMEng/OverLoCK/releases/download/v1/overlock_s_in1k_224.pth')),
    neck=dict(in_channels=[64, 128, 448, 640]))
optim_wrapper = dict(optimizer=dict(lr=0.0001))
