# mmdeploy's deploy config for mmdet detectors on ONNX Runtime with dynamic input shapes.
#
# Source: github.com/open-mmlab/mmdeploy, tag v1.3.1,
#   configs/mmdet/detection/detection_onnxruntime_dynamic.py with its _base_ chain
#   (configs/mmdet/_base_/base_dynamic.py -> configs/mmdet/_base_/base_static.py ->
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
    output_names=['dets', 'labels'],
    input_shape=None,
    optimize=True,
    dynamic_axes={
        'input': {
            0: 'batch',
            2: 'height',
            3: 'width'
        },
        'dets': {
            0: 'batch',
            1: 'num_dets',
        },
        'labels': {
            0: 'batch',
            1: 'num_dets',
        },
    })
codebase_config = dict(
    type='mmdet',
    task='ObjectDetection',
    model_type='end2end',
    post_processing=dict(
        score_threshold=0.05,
        confidence_threshold=0.005,  # for YOLOv3
        iou_threshold=0.5,
        max_output_boxes_per_class=200,
        pre_top_k=5000,
        keep_top_k=100,
        background_label_id=-1,
    ))
backend_config = dict(type='onnxruntime')
