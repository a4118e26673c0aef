# UperNet, OverLoCK-S, ADE20K, 512x512 crops, 160k iterations, 8 GPUs x 2 images.
# Target (authors' release): 51.3 mIoU single-scale.
# Released weights: https://github.com/LMMMEng/OverLoCK/releases/download/v1/upernet_overlock_small_ade20k.pth
_base_ = './_base_/upernet_overlock.py'
model = dict(
    backbone=dict(arch='s', drop_path_rate=0.3,
                  init_cfg=dict(type='Pretrained', checkpoint='https://github.com/LMMMEng/OverLoCK/releases/download/v1/overlock_s_in1k_224.pth')),
    decode_head=dict(in_channels=[64, 128, 448, 640]),
    auxiliary_head=dict(in_channels=448))
