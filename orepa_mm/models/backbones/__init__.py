"""Thin OREPA subclasses of the OpenMMLab backbones (per-library modules: for_mmdet, ...)."""
