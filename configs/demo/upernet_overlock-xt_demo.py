# CPU demo: the real UperNet recipe (upernet_overlock-t_8xb2-160k_ade20k-512x512.py) on the
# synthetic ADE20K-format set of tools/demo/generate_data.py (shapes labelled as ADE20K classes
# 1-3, "wall"/"building"/"sky"; 0 = other, ignored). Changed: variant (XT), data root and classes
# (the 3 drawn classes; the heads' class count follows the dataset, as for any custom dataset),
# image scale (the ADE20K pipeline with every size divided by 4: crop 128), schedule (from scratch;
# drop path, a regulariser for long runs, off). Batch 2 per process, as in the recipe.
_base_ = '../mmseg/upernet_overlock-t_8xb2-160k_ade20k-512x512.py'

data_root = 'data/demo/ade/'
metainfo = dict(classes=('wall', 'building', 'sky'))
num_classes = len(metainfo['classes'])
crop_size = (128, 128)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(arch='xt', drop_path_rate=0.0, init_cfg=None),
    decode_head=dict(in_channels=[56, 112, 340, 420], num_classes=num_classes),  # XT pyramid
    auxiliary_head=dict(in_channels=340, num_classes=num_classes))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(512, 128), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(512, 128), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader

max_iters = 300
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(type='PolyLR', power=1.0, begin=30, end=max_iters, eta_min=0.0, by_epoch=False),
]
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(by_epoch=False, interval=100, max_keep_ckpts=2))
