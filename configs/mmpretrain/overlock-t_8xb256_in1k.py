# OverLoCK-T, ImageNet-1K, 224x224, 300 epochs, 8 GPUs x 256 images.
# Target (authors' release): 84.2 top-1. Test crop_pct 0.95: resize the short edge to
# floor(224 / 0.95) = 235 (bicubic), centre-crop 224.
# Released weights: https://github.com/LMMMEng/OverLoCK/releases/download/v1/overlock_t_in1k_224.pth
_base_ = './_base_/overlock_in1k.py'
model = dict(
    backbone=dict(arch='t', drop_path_rate=0.15),
    head=dict(in_channels=640, aux_in_channels=512))
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=235, edge='short', backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=224),
    dict(type='PackInputs'),
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
