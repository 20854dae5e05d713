# INT8 study (tools/int8_study.py), "DBB" row: the demo Faster R-CNN with mmdet's stock
# ResNet-18 at quarter width whose 3 x 3 convs are Diverse Branch Blocks (orepa_mm's DBB conv
# type: a BN per branch); re-parameterized like the OREPA model.
_base_ = '../faster_rcnn_orepa_r18_demo.py'

model = dict(backbone=dict(type='ResNet', conv_cfg=dict(type='DBB')))
