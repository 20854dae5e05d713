"""Models: OREPA backbones for mmdet, mmseg and mmpretrain."""
