"""orepa_mm backbones built on mmdet's own classes (imported only when mmdet is installed)."""
from mmdet.models.backbones import ResNet, ResNetV1d

from .orepa_resnet import OREPAResNetMixin
from .orepa_vgg import OREPAVGG


class OREPAResNet(OREPAResNetMixin, ResNet):
    """mmdet's ``ResNet`` with OREPA convs (:mod:`.orepa_resnet`)."""


class OREPAResNetV1d(OREPAResNetMixin, ResNetV1d):
    """mmdet's ``ResNetV1d`` with OREPA convs (:mod:`.orepa_resnet`)."""


BACKBONES = {cls.__name__: cls for cls in (OREPAResNet, OREPAResNetV1d, OREPAVGG)}
