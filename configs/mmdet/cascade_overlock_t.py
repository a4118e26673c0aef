# Short name of cascade-mask-rcnn_overlock-t_fpn_4conv1fc-giou_8xb2-ms-crop-3x_coco.py
# (`mim train mmdet configs/mmdet/cascade_overlock_t.py`).
_base_ = './cascade-mask-rcnn_overlock-t_fpn_4conv1fc-giou_8xb2-ms-crop-3x_coco.py'
