# CPU demo: the real UperNet recipe (upernet_overlock-t_8xb2-160k_ade20k-512x512.py) on the
# synthetic ADE20K-format set of tools/demo/generate_data.py (shapes labelled as ADE20K classes
# 1-3, "wall"/"building"/"sky"; 0 = other, ignored). Changed: variant (XT), data root, image
# scale (the ADE20K pipeline with every size divided by 2: crop 256), schedule (from scratch;
# drop path, a regulariser for long runs, off).
_base_ = '../mmseg/upernet_overlock-t_8xb2-160k_ade20k-512x512.py'

data_root = 'data/demo/ade/'
crop_size = (256, 256)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(arch='xt', drop_path_rate=0.0, init_cfg=None),
    decode_head=dict(in_channels=[56, 112, 340, 420]),  # the XT dense pyramid
    auxiliary_head=dict(in_channels=340))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(1024, 256), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(1024, 256), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader

max_iters = 200
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(type='PolyLR', power=1.0, begin=30, end=max_iters, eta_min=0.0, by_epoch=False),
]
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(by_epoch=False, interval=100, max_keep_ckpts=2))
