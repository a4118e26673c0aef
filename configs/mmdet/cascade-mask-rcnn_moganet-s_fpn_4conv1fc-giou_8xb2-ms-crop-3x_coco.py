# Cascade Mask R-CNN, MogaNet-S, FPN, 4conv1fc GIoU heads, MS 3x + crop, COCO. 8 GPUs x 2 images.
# Target (MogaNet paper, ICLR 2024, Table 4): 51.7 box AP / 45.1 mask AP; 82.8M params, 750.2G FLOPs.
# Recipe (authors' cascade_mask_rcnn_moganet_s_fpn_giou_4conv1f_ms_3x_coco.py): drop path 0.1, AdamW
# lr 2e-4 wd 0.05 without decay on layer/element scales and norms, 1000-iter warm-up, 36 epochs.
_base_ = './_base_/cascade-mask-rcnn_baseline_fpn.py'
model = dict(
    backbone=dict(
        type='MogaNet', arch='small', drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='https://github.com/Westlake-AI/MogaNet/releases/download/moganet-in1k-weights/moganet_small_sz224_8xbs128_ep300.pth.tar')),
    neck=dict(in_channels=[64, 128, 320, 512]))
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'layer_scale': dict(decay_mult=0.), 'scale': dict(decay_mult=0.),
                                    'norm': dict(decay_mult=0.)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=36, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
auto_scale_lr = dict(enable=False, base_batch_size=16)
