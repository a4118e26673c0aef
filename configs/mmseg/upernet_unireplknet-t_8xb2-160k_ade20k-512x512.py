# UperNet, UniRepLKNet-T, ADE20K, 512x512 crops, 160k iterations, 8 GPUs x 2 images.
# Target (UniRepLKNet paper, CVPR 2024, Table 6): 48.6 mIoU single-scale (49.1 multi-scale);
# 61M params, 946G FLOPs.
# Recipe (authors' upernet_unireplknet_t_512_160k_ade20k.py): drop path 0.2, AdamW lr 1e-4 wd 0.05,
# layer-wise lr decay 1.0 over 9 layers (only the no-decay rule for biases and 1-D tensors),
# 1500-iter warm-up from 1e-6, poly decay.
_base_ = './_base_/upernet_baseline.py'
model = dict(
    backbone=dict(
        type='UniRepLKNet', arch='t', layout='dense', drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='https://huggingface.co/DingXiaoH/UniRepLKNet/resolve/main/unireplknet_t_in1k_224_acc83.21.pth')),
    decode_head=dict(in_channels=[80, 160, 320, 640]),
    auxiliary_head=dict(in_channels=320))
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='BackboneLayerDecayOptimWrapperConstructor',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(decay_rate=1.0, decay_type='layer_wise', num_layers=9))
auto_scale_lr = dict(enable=False, base_batch_size=16)
