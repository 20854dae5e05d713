# DeepLabV3+, OREPA-ResNet-50-D8 (V1c deep stem), Cityscapes 512x1024, 80k iterations (4 GPUs x 2).
# Identical to mmseg's deeplabv3plus_r50-d8_4xb2-80k_cityscapes-512x1024.py (SyncBN included) except
# for the backbone type, its pretrained weights and a 0.1 LR multiplier on the deep stem (the
# authors' advice for OREPA stems).
#
# Weights: checkpoints/orepa_resnet50_official.pth, converted from the authors' ImageNet model:
#   python tools/convert_official_checkpoint.py <OREPA ResNet-50 .pth.tar> \
#       checkpoints/orepa_resnet50_official.pth
# The authors' ResNet-50 has a 7x7 stem, so the three 3x3 convs of this deep stem are not in it
# and start from random init (mmengine logs them as missing keys); all four stages load.
# Without it, start from mmseg's stock V1c weights (OREPA layers load plain conv weights
# exactly, deep stem included) with the one switch
#   --cfg-options model.backbone.init_cfg.checkpoint=open-mmlab://resnet50_v1c
# Data: data/cityscapes/ (docs/configs.md, 'Datasets').
_base_ = 'mmseg::deeplabv3plus/deeplabv3plus_r50-d8_4xb2-80k_cityscapes-512x1024.py'

custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)
# Validation / test of the unconverted model generates each kernel once per epoch.
custom_hooks = [dict(type='ReparamKernelCacheHook')]

model = dict(
    pretrained=None,  # upstream's open-mmlab://resnet50_v1c, moved into backbone.init_cfg
    backbone=dict(
        type='OREPAResNetV1c',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/orepa_resnet50_official.pth')))

optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'backbone.stem': dict(lr_mult=0.1)}))
