# mmdeploy's deploy config for mmseg segmentors on ONNX Runtime with dynamic input shapes.
#
# Source: github.com/open-mmlab/mmdeploy, tag v1.3.1,
#   configs/mmseg/segmentation_onnxruntime_dynamic.py with its _base_ chain
#   (configs/mmseg/segmentation_dynamic.py -> configs/mmseg/segmentation_static.py ->
#   configs/_base_/onnx_config.py, and configs/_base_/backends/onnxruntime.py) merged into this
#   one file: the mmdeploy wheel ships no configs, and tools/mmdeploy_check.sh needs no clone.
# Copyright (c) OpenMMLab. Licensed under the Apache License, Version 2.0
#   (http://www.apache.org/licenses/LICENSE-2.0). Values unchanged; only the layout differs.
onnx_config = dict(
    type='onnx',
    export_params=True,
    keep_initializers_as_inputs=False,
    opset_version=11,
    save_file='end2end.onnx',
    input_names=['input'],
    output_names=['output'],
    input_shape=None,
    optimize=True,
    dynamic_axes={
        'input': {
            0: 'batch',
            2: 'height',
            3: 'width'
        },
        'output': {
            0: 'batch',
            2: 'height',
            3: 'width'
        },
    })
codebase_config = dict(type='mmseg', task='Segmentation', with_argmax=True)
backend_config = dict(type='onnxruntime')
