# Mask R-CNN, OverLoCK-B, FPN, 1x, COCO. 8 GPUs x 2 images.
# Target (authors' release, box AP / mask AP on val2017): 49.9 / 44.4.
# Released weights: https://github.com/LMMMEng/OverLoCK/releases/download/v1/maskrcnn1x_overlock_base_coco.pth
_base_ = ['./_base_/mask-rcnn_overlock_fpn.py', './_base_/schedule-1x.py']
model = dict(
    backbone=dict(arch='b', drop_path_rate=0.6,
                  init_cfg=dict(type='Pretrained', checkpoint='https://github.com/LMMMEng/OverLoCK/releases/download/v1/overlock_b_in1k_224.pth')),
    neck=dict(in_channels=[80, 160, 528, 720]))
optim_wrapper = dict(optimizer=dict(lr=0.0002))
