# INT8 study (tools/int8_study.py), "plain RepVGG" row: the demo Faster R-CNN with mmpretrain's
# RepVGG, A0's depth (num_blocks 2-4-14-1) at the demo's width (16-32-64-128 channels, the
# quarter-width ResNet-18's), trained with identity / 1x1 / 3x3 BN branches and fused at deploy.
_base_ = '../faster_rcnn_orepa_r18_demo.py'

custom_imports = dict(imports=['orepa_mm', 'mmpretrain.models'], allow_failed_imports=False)

a0_small = dict(num_blocks=[2, 4, 14, 1], width_factor=[0.25, 0.25, 0.25, 0.25],
                group_layer_map=None, se_cfg=None)
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmpretrain.RepVGG',
        arch=a0_small,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False,
        init_cfg=None))
