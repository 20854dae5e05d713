# INT8 study (tools/int8_study.py), "plain" row: the demo Faster R-CNN of
# ../faster_rcnn_orepa_r18_demo.py with mmdet's stock ResNet-18 at the same quarter width
# (base_channels=16), same data, schedule and seed.
_base_ = '../faster_rcnn_orepa_r18_demo.py'

model = dict(backbone=dict(type='ResNet'))
