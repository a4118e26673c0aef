# UperNet with an OverLoCK backbone in the released segmentation layout, ADE20K 512x512, 160k.
_base_ = ['mmseg::_base_/models/upernet_r50.py', 'mmseg::_base_/datasets/ade20k.py',
          'mmseg::_base_/default_runtime.py', 'mmseg::_base_/schedules/schedule_160k.py']
custom_imports = dict(imports=['overlock_mm'], allow_failed_imports=False)
# mmengine's Runner plus a check of the dataset paths before the loops build them, for every
# entry point (tools/train.py, mim train, the libraries' scripts); data_check = False skips it
runner_type = 'DataCheckRunner'

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='OverLoCK',
        arch='t',
        layout='seg',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2),
    # The dense pyramid: C0, C1, C2 + C3/4, C3 + C3/4 (T: 64, 128, 384, 640).
    decode_head=dict(in_channels=[64, 128, 384, 640], num_classes=150),
    # Auxiliary FCN head on level 2 (C2 + C3/4 channels).
    auxiliary_head=dict(in_index=2, in_channels=384, num_classes=150),
    test_cfg=dict(mode='whole'))

# BatchNorm everywhere becomes SyncBatchNorm under distributed training (mmengine reverts the
# heads' SyncBN to BatchNorm in single-process runs).
sync_bn = 'torch'

# AdamW lr 6e-5, wd 0.01; linear warm-up 1500 iterations from 1e-6; poly decay (power 1) to 0.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(norm_decay_mult=0., bias_decay_mult=0., flat_decay_mult=0.,
                       custom_keys={'.rpb1': dict(decay_mult=0.), '.rpb2': dict(decay_mult=0.)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, begin=1500, end=160000, eta_min=0.0, by_epoch=False),
]

# 8 GPUs x 2 images.
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
auto_scale_lr = dict(enable=False, base_batch_size=16)
