# INT8 study (tools/int8_study.py), "OREPA-VGG" row: as faster_rcnn_repvgg_a0s_demo.py (A0's
# depth at the demo's width) with orepa_mm's OREPAVGG: RepVGG whose dense 3 x 3 branch is an
# OREPA block (one BN after the squeezed kernel); RepVGG's 1x1 and identity BN branches stay.
_base_ = './faster_rcnn_repvgg_a0s_demo.py'

model = dict(backbone=dict(type='OREPAVGG'))
