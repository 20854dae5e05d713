"""Datasets shipped with orepa_mm: the synthetic shapes dataset of the demo."""
from .synthetic import (CLASSES, DET_METAINFO, SEG_CLASSES, SEG_METAINFO, DemoDatasetSpec,
                        ensure_demo_dataset, generate_demo_dataset)

__all__ = ['CLASSES', 'SEG_CLASSES', 'DET_METAINFO', 'SEG_METAINFO', 'DemoDatasetSpec',
           'generate_demo_dataset', 'ensure_demo_dataset']
