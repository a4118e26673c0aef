# OverLoCK ImageNet-1K recipe (docs/spec/RESULTS.md, the authors' release): 300 epochs, AdamW lr 1e-3 per
# 1024 images (2e-3 at 8 x 256), wd 0.05, cosine to 1e-5 after 5 warm-up epochs from 1e-6,
# EMA 0.9999, grad clip 5, AMP, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25,
# mixup 0.8 / cutmix 1.0, label smoothing 0.1, aux-head loss weight 0.4.
# Colour jitter 0.4 is inactive in the authors' timm pipeline whenever RandAugment is on, so it is
# omitted; timm's "random" train interpolation is approximated by bicubic.
_base_ = ['mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
          'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',
          'mmpretrain::_base_/default_runtime.py']
custom_imports = dict(imports=['overlock_mm'], allow_failed_imports=False)
# mmengine's Runner plus a check of the dataset paths before the loops build them, for every
# entry point (tools/train.py, mim train, the libraries' scripts); data_check = False skips it
runner_type = 'DataCheckRunner'

model = dict(
    # An ImageClassifier that also loads the released `overlock_*_in1k_224.pth` files directly.
    type='OverLoCKClassifier',
    backbone=dict(type='OverLoCK', arch='t', layout='cls', out_indices=(3, 4),
                  drop_path_rate=0.15),
    neck=None,
    head=dict(
        type='OverLoCKClsHead',
        num_classes=1000,
        in_channels=640,  # C3 + C3 / 4
        aux_in_channels=512,  # C3, the Overview-Net output
        aux_loss_weight=0.4,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original')),
    train_cfg=dict(augments=[dict(type='Mixup', alpha=0.8), dict(type='CutMix', alpha=1.0)]))

# 8 GPUs x 256 images.
train_dataloader = dict(batch_size=256)
val_dataloader = dict(batch_size=128)
test_dataloader = val_dataloader

optim_wrapper = dict(
    type='AmpOptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-3, weight_decay=0.05, eps=1e-8, betas=(0.9, 0.999)),
    clip_grad=dict(max_norm=5.0),
    paramwise_cfg=dict(_delete_=True, norm_decay_mult=0., bias_decay_mult=0., flat_decay_mult=0.,
                       custom_keys={'.rpb1': dict(decay_mult=0.), '.rpb2': dict(decay_mult=0.)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6 / 2e-3, by_epoch=True, begin=0, end=5,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=5, end=300),
]
train_cfg = dict(by_epoch=True, max_epochs=300, val_interval=1)

# EMA decay 0.9999 (mmengine's momentum is 1 - decay).
# ReleasedCheckpointHook: `load_from=<released overlock_*_in1k_224(_reparam).pth>` (a bare state dict)
# is wrapped into an mmengine checkpoint before EMAHook and the model see it.
custom_hooks = [dict(type='EMAHook', momentum=1e-4, priority='ABOVE_NORMAL'),
                dict(type='ReleasedCheckpointHook')]
# BatchNorm becomes SyncBatchNorm under distributed training.
sync_bn = 'torch'
auto_scale_lr = dict(enable=False, base_batch_size=2048)
