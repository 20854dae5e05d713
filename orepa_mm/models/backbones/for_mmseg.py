"""orepa_mm backbones built on mmseg's own classes (imported only when mmseg is installed)."""
from mmseg.models.backbones import ResNet, ResNetV1c, ResNetV1d

from .orepa_resnet import OREPAResNetMixin
from .orepa_vgg import OREPAVGG


class OREPAResNet(OREPAResNetMixin, ResNet):
    """mmseg's ``ResNet`` with OREPA convs (:mod:`.orepa_resnet`)."""


class OREPAResNetV1c(OREPAResNetMixin, ResNetV1c):
    """mmseg's ``ResNetV1c`` with OREPA convs (:mod:`.orepa_resnet`)."""


class OREPAResNetV1d(OREPAResNetMixin, ResNetV1d):
    """mmseg's ``ResNetV1d`` with OREPA convs (:mod:`.orepa_resnet`)."""


BACKBONES = {cls.__name__: cls for cls in (OREPAResNet, OREPAResNetV1c, OREPAResNetV1d, OREPAVGG)}
