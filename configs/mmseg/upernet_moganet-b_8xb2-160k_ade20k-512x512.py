# UperNet, MogaNet-B, ADE20K, 512x512 crops, 160k iterations, 8 GPUs x 2 images.
# Target (MogaNet paper, ICLR 2024, Table 5): 50.1 mIoU single-scale; 73.7M params, 1050.4G FLOPs.
# Recipe (authors' upernet_moganet_base_512x512_160k_ade20k.py): drop path 0.2, AdamW lr 6e-5
# wd 0.01 without decay on layer/element scales and norms, 1500-iter warm-up from 1e-6, poly decay.
_base_ = './_base_/upernet_baseline.py'
model = dict(
    backbone=dict(
        type='MogaNet', arch='base', drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='https://github.com/Westlake-AI/MogaNet/releases/download/moganet-in1k-weights/moganet_base_sz224_8xbs128_ep300.pth.tar')),
    decode_head=dict(in_channels=[64, 160, 320, 512]),
    auxiliary_head=dict(in_channels=320))
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={'layer_scale': dict(decay_mult=0.), 'scale': dict(decay_mult=0.),
                                    'norm': dict(decay_mult=0.)}))
auto_scale_lr = dict(enable=False, base_batch_size=16)
