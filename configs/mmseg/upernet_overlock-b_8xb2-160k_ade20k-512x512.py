# UperNet, OverLoCK-B, ADE20K, 512x512 crops, 160k iterations, 8 GPUs x 2 images.
# Target (authors' release): 51.7 mIoU single-scale.
# Released weights: https://github.com/LMMMEng/OverLoCK/releases/download/v1/upernet_overlock_base_ade20k.pth
_base_ = './_base_/upernet_overlock.py'
model = dict(
    backbone=dict(arch='b', drop_path_rate=0.5,
                  init_cfg=dict(type='Pretrained', checkpoint='https://github.com/LMMMEng/OverLoCK/releases/download/v1/overlock_b_in1k_224.pth')),
    decode_head=dict(in_channels=[80, 160, 528, 720]),
    auxiliary_head=dict(in_channels=528))
