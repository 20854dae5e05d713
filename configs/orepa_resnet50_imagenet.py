# OREPA-ResNet-50 on ImageNet-1k with mmpretrain, the paper's recipe: 120 epochs, batch 256 in
# total (8 GPUs x 32), SGD lr 0.1 with cosine decay, weight decay 1e-4 on conv/linear weights
# only (none on norms and biases). Trained from scratch; standard RandomResizedCrop + flip.
# Data: data/imagenet/{train,val}/ (docs/configs.md, 'Datasets').
_base_ = 'mmpretrain::resnet/resnet50_8xb32-coslr_in1k.py'

custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)
# Validation / test of the unconverted model generates each kernel once per epoch.
custom_hooks = [dict(type='ReparamKernelCacheHook')]

model = dict(backbone=dict(type='OREPAResNet'))

# Name the image folders, so that a missing dataset is reported with the folder it needs.
train_dataloader = dict(dataset=dict(data_prefix='train'))
val_dataloader = dict(dataset=dict(data_prefix='val'))
test_dataloader = val_dataloader

max_epochs = 120
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0))
param_scheduler = [
    dict(type='CosineAnnealingLR', T_max=max_epochs, by_epoch=True, begin=0, end=max_epochs)
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=1)
auto_scale_lr = dict(base_batch_size=256)
