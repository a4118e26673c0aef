# 1x: single scale (1333, 800), 12 epochs, lr steps at 8 and 11, 500-iteration warm-up.
_base_ = ['mmdet::_base_/datasets/coco_instance.py']
train_dataloader = dict(batch_size=2)
max_epochs = 12
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11],
         gamma=0.1),
]
