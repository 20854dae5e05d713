"""orepa_mm: Online Convolutional Re-parameterization (OREPA) for OpenMMLab."""
from setuptools import find_packages, setup


def fused_ops():
    """The fused CPU loops of kernel generation (orepa_mm/csrc), built when torch is present.

    Optional: if the compiler fails, orepa_mm still installs and uses its pure PyTorch path.
    torch/torchvision and mmcv are installed by tools/install_deps.sh first, and orepa_mm with
    ``pip install --no-build-isolation`` so that this build sees that torch.
    """
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return {}, []
    extension = CppExtension(
        'orepa_mm._kxk_kernel_ops', ['orepa_mm/csrc/kxk_kernel_ops.cpp'],
        extra_compile_args=['-O3', '-fopenmp'],
        extra_link_args=['-fopenmp'],
        optional=True)
    return {'build_ext': BuildExtension}, [extension]


cmdclass, ext_modules = fused_ops()

setup(
    name='orepa_mm',
    version='0.1.0',
    description=('OREPA (CVPR 2022) as an OpenMMLab conv type and backbones for mmdet, mmseg, '
                 'mmpretrain'),
    packages=find_packages(include=['orepa_mm', 'orepa_mm.*']),
    python_requires='>=3.10',
    install_requires=['mmengine>=0.10.4,<0.11'],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    license='Apache-2.0',
)
