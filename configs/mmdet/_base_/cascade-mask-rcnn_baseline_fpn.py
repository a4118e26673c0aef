# Cascade Mask R-CNN + FPN, 4conv1fc GIoU heads (SyncBN), MS 3x + crop, for the baseline backbones
# (MogaNet, UniRepLKNet). Everything but the backbone (and its optimiser recipe) is inherited from
# the OverLoCK detector, so a comparison differs in the backbone alone. Both baselines' authors
# used this detector (GitHub Westlake-AI/MogaNet detection/configs/_base_/models/
# cascade_mask_rcnn_moganet_fpn_giou_4conv1f.py; AILab-CVC/UniRepLKNet detection/configs/coco/
# casc_mask_rcnn_unireplknet_*_in1k_fpn_3x_coco.py) with the same DETR-style crop augmentation.
_base_ = ['./cascade-mask-rcnn_overlock_fpn.py', './ms-crop-3x.py']
model = dict(backbone=dict(_delete_=True, type='MogaNet', arch='small', out_indices=(0, 1, 2, 3)))
