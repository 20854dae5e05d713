# Faster R-CNN, OREPA-ResNet-50 + OREPA-FPN, COCO 1x (12 epochs, 8 GPUs x 2 images).
# faster_rcnn_orepa_r50.py with the FPN built with conv_cfg=dict(type='OREPA') as well: its 1x1
# lateral convs and 3x3 output convs become OREPA layers (1x1 and k x k blocks, with the conv
# bias mmdet's ConvModule gives a conv without a norm). Deploying gives the stock FPN, so the
# deployed model is mmdet's faster-rcnn_r50_fpn_1x_coco.py model exactly.
#
# BEYOND THE PAPER: OREPA (CVPR 2022) re-parameterizes the backbone only, and all its reported
# detection numbers are for an OREPA backbone with a plain FPN (faster_rcnn_orepa_r50.py). This
# config is an extension with no published result to compare against.
#
# The RPN head keeps its plain 3x3 conv: mmdet's RPNHead builds it with nn.Conv2d, not through
# conv_cfg (and the RoI head's Shared2FCBBoxHead has no convs).
#
# Weights: as faster_rcnn_orepa_r50.py (checkpoints/orepa_resnet50_official.pth for the
# backbone; the FPN starts from mmdet's initialisation either way). Without the converted
# official checkpoint, start from stock torchvision weights with the one switch
#   --cfg-options model.backbone.init_cfg.checkpoint=torchvision://resnet50
# Data: data/coco/ (docs/configs.md, 'Datasets').
_base_ = './faster_rcnn_orepa_r50.py'

model = dict(neck=dict(conv_cfg=dict(type='OREPA')))
