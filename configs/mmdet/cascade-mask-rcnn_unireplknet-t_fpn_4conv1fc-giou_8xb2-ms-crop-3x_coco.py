# Cascade Mask R-CNN, UniRepLKNet-T, FPN, 4conv1fc GIoU heads, MS 3x + crop, COCO. 8 GPUs x 2 images.
# Target (UniRepLKNet paper, CVPR 2024, Table 5): 51.7 box AP / 44.9 mask AP; 89M params, 749G FLOPs.
# Recipe (authors' casc_mask_rcnn_unireplknet_t_in1k_fpn_3x_coco.py): drop path 0.3, gradient
# checkpointing, AdamW lr 1e-4 wd 0.05 with layer-wise lr decay 0.8 over 12 layers, mmdet's 3x
# schedule (500-iter warm-up, steps at 27 and 33 of 36 epochs).
_base_ = './_base_/cascade-mask-rcnn_baseline_fpn.py'
model = dict(
    backbone=dict(
        type='UniRepLKNet', arch='t', layout='dense', drop_path_rate=0.3, with_cp=True,
        init_cfg=dict(type='Pretrained', checkpoint='https://huggingface.co/DingXiaoH/UniRepLKNet/resolve/main/unireplknet_t_in1k_224_acc83.21.pth')),
    neck=dict(in_channels=[80, 160, 320, 640]))
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='BackboneLayerDecayOptimWrapperConstructor',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(decay_rate=0.8, decay_type='layer_wise', num_layers=12))
auto_scale_lr = dict(enable=False, base_batch_size=16)
