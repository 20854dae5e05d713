"""orepa_mm: OREPA (Online Convolutional Re-parameterization) for OpenMMLab."""
