"""Run a deployed model the way users will: in a process that never imports orepa_mm.

    python tests/reparam_fresh_process.py CONFIG CHECKPOINT IMAGE.pt OUT.pt [CONFIG ...]

For each group of four arguments: loads CONFIG + CHECKPOINT with the library's own inference
API (``mmdet.apis.init_detector``, ``mmseg.apis.init_model``, ``mmpretrain.apis.get_model``),
runs it on the uint8 image saved in IMAGE.pt and saves every output (see :func:`outputs`) to
OUT.pt, after asserting that orepa_mm was never imported. Several models share one process
because importing the libraries is most of the cost. The test process imports :func:`outputs`
from here to compute the train-time reference the same way, so neither side shares code with
orepa_mm's own verification.
"""
import sys

import torch
from mmengine.structures import BaseDataElement


def _sample(library: str, height: int, width: int):
    shape = (height, width)
    if library == 'mmdet':
        from mmdet.structures import DetDataSample
        return DetDataSample(
            metainfo=dict(img_id=0, ori_shape=shape, img_shape=shape, scale_factor=(1.0, 1.0)))
    if library == 'mmseg':
        from mmseg.structures import SegDataSample
        return SegDataSample(metainfo=dict(ori_shape=shape, img_shape=shape, pad_shape=shape))
    from mmpretrain.structures import DataSample
    return DataSample(metainfo=dict(ori_shape=shape, img_shape=shape))


def _batch(model, image):
    library = type(model).__module__.split('.')[0]
    data = dict(inputs=[image], data_samples=[_sample(library, *image.shape[-2:])])
    return model.data_preprocessor(data, False)


def _tensors(prefix, value, found):
    if isinstance(value, torch.Tensor):
        found[prefix] = value.detach().cpu()
    elif isinstance(value, (BaseDataElement, dict)):
        for key, item in value.items():
            _tensors(f'{prefix}.{key}', item, found)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _tensors(f'{prefix}.{index}', item, found)
    return found


@torch.no_grad()
def outputs(model, image):
    """Backbone outputs, neck outputs, raw head outputs and predictions, by dotted name."""
    found = {}
    inputs = _batch(model, image)['inputs']
    _tensors('backbone', model.backbone(inputs), found)
    if getattr(model, 'with_neck', False):
        _tensors('neck', model.extract_feat(inputs), found)
    _tensors('head', model(**_batch(model, image), mode='tensor'), found)
    _tensors('predict', model(**_batch(model, image), mode='predict'), found)
    return found


def load_deployed(config, checkpoint):
    """The library's inference API on ``config`` + ``checkpoint``, on CPU, eval mode."""
    from mmengine.config import Config
    scope = Config.fromfile(config).get('default_scope')
    if scope == 'mmdet':
        from mmdet.apis import init_detector
        return init_detector(config, checkpoint, device='cpu')
    if scope == 'mmseg':
        from mmseg.apis import init_model
        return init_model(config, checkpoint, device='cpu')
    from mmpretrain.apis import get_model
    model = get_model(config, pretrained=checkpoint, device='cpu')
    model.eval()
    return model


def main(argv):
    assert argv and len(argv) % 4 == 0, __doc__
    for start in range(0, len(argv), 4):
        config, checkpoint, image_path, out_path = argv[start:start + 4]
        model = load_deployed(config, checkpoint)
        image = torch.load(image_path, weights_only=True)
        result = outputs(model, image)
        imported = [m for m in sys.modules if m == 'orepa_mm' or m.startswith('orepa_mm.')]
        assert not imported, f'orepa_mm was imported: {imported}'
        torch.save(result, out_path)


if __name__ == '__main__':
    main(sys.argv[1:])
