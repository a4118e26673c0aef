# Cascade Mask R-CNN, UniRepLKNet-S, FPN, 4conv1fc GIoU heads, MS 3x + crop, COCO. 8 GPUs x 2 images.
# Target (UniRepLKNet paper, CVPR 2024, Table 5): 53.0 box AP / 45.9 mask AP; 113M params, 835G FLOPs.
# Recipe (authors' casc_mask_rcnn_unireplknet_s_in1k_fpn_3x_coco.py): drop path 0.5, gradient
# checkpointing, AdamW lr 1e-4 wd 0.05 with layer-wise lr decay 0.8 over 12 layers, mmdet's 3x
# schedule (500-iter warm-up, steps at 27 and 33 of 36 epochs).
_base_ = './_base_/cascade-mask-rcnn_baseline_fpn.py'
model = dict(
    backbone=dict(
        type='UniRepLKNet', arch='s', layout='dense', drop_path_rate=0.5, with_cp=True,
        init_cfg=dict(type='Pretrained', checkpoint='https://huggingface.co/DingXiaoH/UniRepLKNet/resolve/main/unireplknet_s_in1k_224_acc83.91.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]))
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='BackboneLayerDecayOptimWrapperConstructor',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(decay_rate=0.8, decay_type='layer_wise', num_layers=12))
auto_scale_lr = dict(enable=False, base_batch_size=16)
