# OverLoCK-B, ImageNet-1K, 224x224, 300 epochs, 8 GPUs x 256 images.
# Target (authors' release): 85.1 top-1. Test crop_pct 0.975: resize the short edge to
# floor(224 / 0.975) = 229 (bicubic), centre-crop 224.
# Released weights: https://github.com/LMMMEng/OverLoCK/releases/download/v1/overlock_b_in1k_224.pth
_base_ = './_base_/overlock_in1k.py'
model = dict(
    backbone=dict(arch='b', drop_path_rate=0.5),
    head=dict(in_channels=720, aux_in_channels=576))
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=229, edge='short', backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=224),
    dict(type='PackInputs'),
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
