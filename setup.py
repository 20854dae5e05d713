"""orepa_mm: Online Convolutional Re-parameterization (OREPA) for OpenMMLab."""
from setuptools import find_packages, setup

setup(
    name='orepa_mm',
    version='0.1.0',
    description='OREPA (CVPR 2022) as an OpenMMLab conv type and backbones for mmdet, mmseg, mmpretrain',
    packages=find_packages(include=['orepa_mm', 'orepa_mm.*']),
    python_requires='>=3.10',
    # torch/torchvision and mmcv (built with ops) are installed by tools/install_deps.sh first.
    install_requires=['mmengine>=0.10.4,<0.11'],
    license='Apache-2.0',
)
