# CPU demo: the real Cascade Mask R-CNN recipe (cascade_overlock_t.py) on the synthetic COCO set
# of tools/demo/generate_data.py. Changed: variant (XT, the smallest, for CPU), data root and
# classes (3: the heads' class count follows the dataset, as for any custom dataset), image scale
# (128 px, single scale: the 480-800 px multi-scale crop schedule has no meaning at demo size),
# schedule (a few hundred iterations from scratch: no ImageNet weights offline; drop path, a
# regulariser for long runs, off), and the RoI budget (below).
_base_ = '../mmdet/cascade_overlock_t.py'

data_root = 'data/demo/coco/'
metainfo = dict(classes=('circle', 'square', 'triangle'))
image_scale = (128, 128)
num_classes = len(metainfo['classes'])


def _rcnn_stage(iou):
    # the recipe's stage settings (mmdet's cascade-mask-rcnn_r50_fpn.py) with 32 sampled RoIs,
    # up to half of them positive
    return dict(
        assigner=dict(type='MaxIoUAssigner', pos_iou_thr=iou, neg_iou_thr=iou, min_pos_iou=iou,
                      match_low_quality=False, ignore_iof_thr=-1),
        sampler=dict(type='RandomSampler', num=32, pos_fraction=0.5, neg_pos_ub=-1,
                     add_gt_as_proposals=True),
        mask_size=28, pos_weight=-1, debug=False)


def _giou_head(stds):
    # the recipe's 4conv1fc GIoU head (configs/mmdet/_base_/cascade-mask-rcnn_overlock_fpn.py),
    # restated because mmengine replaces lists instead of merging them; only num_classes differs
    return dict(
        type='ConvFCBBoxHead', num_shared_convs=4, num_shared_fcs=1, in_channels=256,
        conv_out_channels=256, fc_out_channels=1024, roi_feat_size=7, num_classes=num_classes,
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.],
                        target_stds=stds),
        reg_class_agnostic=False, reg_decoded_bbox=True,
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=10.0))


# RoI budget. The network (backbone, FPN, RPN, three 4conv1fc GIoU box heads, mask heads) is the
# recipe's, unchanged. What is not: how many RoIs are sampled per image for the heads (512, a
# quarter positive at most -> 32, half positive at most) and how many proposals are kept (train
# 2000 -> 256, test 1000 -> 100). The heads cost the same per RoI at any image size -- 3 stages x
# 512 RoIs x 4 convs (256 ch, 7x7) are ~180 GMAC per image per forward, >10 s per iteration on a
# 2-core CPU, and mmcv's CPU RoIAlign backward takes ~2 ms per RoI -- while a 128 px demo image
# holds 1-3 objects, so a few dozen RoIs per image with up to 16 positives is already plenty.
model = dict(
    backbone=dict(arch='xt', drop_path_rate=0.0, init_cfg=None),
    neck=dict(in_channels=[56, 112, 340, 420]),  # the XT dense pyramid
    roi_head=dict(
        bbox_head=[_giou_head([0.1, 0.1, 0.2, 0.2]), _giou_head([0.05, 0.05, 0.1, 0.1]),
                   _giou_head([0.033, 0.033, 0.067, 0.067])],
        mask_head=dict(num_classes=num_classes)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=256),
        rcnn=[_rcnn_stage(0.5), _rcnn_stage(0.6), _rcnn_stage(0.7)]),
    test_cfg=dict(rpn=dict(nms_pre=300, max_per_img=100), rcnn=dict(max_per_img=20)))
del _rcnn_stage, _giou_head

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/instances_train.json', data_prefix=dict(img='train/'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/instances_val.json', data_prefix=dict(img='val/'),
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

max_iters = 300
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters,
                 val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters,
         milestones=[int(max_iters * 0.8)], gamma=0.1),
]
# fused=True: PyTorch's single-kernel AdamW, same update; on the 2-core CPU its step over the
# detector's parameters takes a quarter of the default loop's time (0.06 vs 0.23 s for 62 M)
optim_wrapper = dict(optimizer=dict(lr=4e-4, fused=True))
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(by_epoch=False, interval=100, max_keep_ckpts=2))
log_processor = dict(by_epoch=False)
