# UperNet, UniRepLKNet-S, ADE20K, 512x512 crops, 160k iterations, 8 GPUs x 2 images.
# Target (UniRepLKNet paper, CVPR 2024, Table 6): 50.5 mIoU single-scale (51.0 multi-scale);
# 86M params, 1036G FLOPs.
# Recipe (authors' upernet_unireplknet_s_512_160k_ade20k.py): drop path 0.3, gradient checkpointing,
# AdamW lr 1e-4 wd 0.05, layer-wise lr decay 0.9 over 12 layers, 1500-iter warm-up from 1e-6, poly.
_base_ = './_base_/upernet_baseline.py'
model = dict(
    backbone=dict(
        type='UniRepLKNet', arch='s', layout='dense', drop_path_rate=0.3, with_cp=True,
        init_cfg=dict(type='Pretrained', checkpoint='https://huggingface.co/DingXiaoH/UniRepLKNet/resolve/main/unireplknet_s_in1k_224_acc83.91.pth')),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='BackboneLayerDecayOptimWrapperConstructor',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(decay_rate=0.9, decay_type='layer_wise', num_layers=12))
auto_scale_lr = dict(enable=False, base_batch_size=16)
