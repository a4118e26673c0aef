# CPU demo: the real ImageNet recipe (overlock-xt_8xb256_in1k.py: mixup/cutmix, RandAugment,
# random erasing, label smoothing, aux-head loss, EMA) on the synthetic image-folder set of
# tools/demo/generate_data.py. Changed: data root and classes (3: the head's and the mixup/cutmix
# one-hot class count follow the dataset, as for any custom dataset), image scale (128 px),
# schedule (a few hundred iterations from scratch; the EMA horizon scaled with it; drop path, a
# regulariser for 300-epoch runs, off), fp32 instead of AMP on CPU.
_base_ = '../mmpretrain/overlock-xt_8xb256_in1k.py'

data_root = 'data/demo/cls/'
num_classes = 3
data_preprocessor = dict(num_classes=num_classes)
bgr_mean = [103.53, 116.28, 123.675]
bgr_std = [57.375, 57.12, 58.395]
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=128, backend='pillow', interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='RandAugment', policies='timm_increasing', num_policies=2, total_level=10,
         magnitude_level=9, magnitude_std=0.5,
         hparams=dict(pad_val=[round(x) for x in bgr_mean], interpolation='bicubic')),
    dict(type='RandomErasing', erase_prob=0.25, mode='rand', min_area_ratio=0.02,
         max_area_ratio=1 / 3, fill_color=bgr_mean, fill_std=bgr_std),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=138, edge='short', backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=128),  # crop_pct 0.925 as in the XT recipe
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=16, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root, data_prefix='train',
                 pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(
    batch_size=16, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root, data_prefix='val',
                 pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1,))
test_evaluator = val_evaluator

model = dict(backbone=dict(drop_path_rate=0.0), head=dict(num_classes=num_classes))
max_iters = 200
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters,
                 val_interval=max_iters)
val_cfg = dict()
test_cfg = dict()
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=20),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=False, begin=20, end=max_iters),
]
custom_hooks = [dict(type='EMAHook', momentum=0.02, priority='ABOVE_NORMAL')]
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(by_epoch=False, interval=100, max_keep_ckpts=2))
log_processor = dict(by_epoch=False)
