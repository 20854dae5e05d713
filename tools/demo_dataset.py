"""The demo's dataset: small, procedurally drawn, in COCO and mmseg formats (demo-only).

Real datasets cannot be downloaded everywhere, so ``tools/demo.py`` and the tests draw their own:
circles, squares, triangles and stars (the four classes) in eight colours (each class favours
two of them, but 30% of the objects wear any colour, so only the shape always tells), at sizes
from ~14 to ~100 px, rotated, shaded, partly hidden behind each other, on noisy textured
backgrounds with unlabelled clutter (lines, blobs, ellipses). Everything follows
from one seed, so two runs with the same arguments write byte-identical files.

Layout under ``root`` (``data/demo`` by default, git-ignored)::

    images/{train,val}/000000.jpg             RGB images (written as BGR JPEG by OpenCV)
    annotations/instances_{train,val}.json    COCO instances: boxes + polygon masks of the
                                              *visible* part of every object
    seg_labels/{train,val}/000000.png         mmseg label maps: 0 background, 1..4 the classes
    meta.json                                 the generation arguments (written last)

Both formats are read by stock classes: mmdet's ``CocoDataset`` and mmseg's ``BaseSegDataset``
with ``metainfo=dict(classes=..., palette=...)`` (see :data:`DET_METAINFO` and
:data:`SEG_METAINFO`), so nothing new is registered.
"""
import json
import math
import os
import os.path as osp
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from orepa_mm.utils.atomic_write import OutputSet

__all__ = [
    'CLASSES', 'SEG_CLASSES', 'DET_METAINFO', 'SEG_METAINFO', 'DemoDatasetSpec',
    'generate_demo_dataset', 'ensure_demo_dataset', 'draw_sample'
]

FORMAT_VERSION = 2  # bump whenever the files drawn for a spec change
CLASSES = ('circle', 'square', 'triangle', 'star')
SEG_CLASSES = ('background', ) + CLASSES
# Palette of the classes (for visualisation only: the drawn colours are random per object).
PALETTE = [(220, 20, 60), (0, 130, 230), (250, 170, 30), (120, 200, 60)]
DET_METAINFO = dict(classes=CLASSES, palette=PALETTE)
SEG_METAINFO = dict(classes=SEG_CLASSES, palette=[(0, 0, 0)] + PALETTE)

# Object colours (RGB). Class k's own colours are k and k + 4; with probability
# ``colour_hint`` an object wears one of them, otherwise any of the eight, so colour is a hint
# that speeds up learning but only the shape tells the class of every object.
COLOURS = np.array([(230, 40, 40), (40, 190, 60), (50, 80, 230), (240, 210, 40), (200, 60, 210),
                    (40, 200, 210), (245, 140, 30), (235, 235, 235)],
                   dtype=np.float32)


@dataclass(frozen=True)
class DemoDatasetSpec:
    """What :func:`generate_demo_dataset` draws; ``meta.json`` stores it."""
    num_train: int = 600
    num_val: int = 120
    img_size: int = 256
    min_objects: int = 2
    max_objects: int = 6
    min_size: int = 14  # object diameter in px (before rotation)
    max_size: int = 100
    max_occlusion: float = 0.45  # an object never loses more than this fraction to others
    colour_hint: float = 0.7  # chance that an object wears one of its class's two colours
    seed: int = 0
    version: int = FORMAT_VERSION


# ------------------------------------------------------------------------------------- drawing
def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured, noisy float32 RGB background in [0, 255]."""
    base = rng.uniform(40, 200, size=3).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    img = base + ramp * rng.uniform(-60, 60, size=3).astype(np.float32)
    # low-frequency blotches
    cells = int(rng.integers(3, 9))
    low = rng.normal(0, 25, size=(cells, cells, 3)).astype(np.float32)
    img += cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    # a periodic texture (stripes or checkers) of random period, direction and contrast
    period = rng.uniform(6, 30)
    phase = rng.uniform(0, 2 * np.pi)
    kind = rng.integers(3)
    u = (np.cos(angle + 1.0) * xx + np.sin(angle + 1.0) * yy) * size
    v = (-np.sin(angle + 1.0) * xx + np.cos(angle + 1.0) * yy) * size
    if kind == 0:
        tex = np.sin(2 * np.pi * u / period + phase)
    elif kind == 1:
        tex = np.sign(np.sin(2 * np.pi * u / period + phase) * np.sin(2 * np.pi * v / period))
    else:
        tex = np.sin(2 * np.pi * u / period) * np.cos(2 * np.pi * v / (period * 1.7) + phase)
    img += (tex[..., None] * rng.uniform(5, 25)).astype(np.float32)
    # unlabelled clutter: lines, small blobs, thin ellipses
    for _ in range(int(rng.integers(2, 8))):
        colour = tuple(float(c) for c in rng.uniform(0, 255, size=3))
        choice = rng.integers(3)
        p1 = tuple(int(c) for c in rng.integers(0, size, size=2))
        if choice == 0:
            p2 = tuple(int(c) for c in rng.integers(0, size, size=2))
            cv2.line(img, p1, p2, colour, int(rng.integers(1, 3)), cv2.LINE_AA)
        elif choice == 1:
            cv2.circle(img, p1, int(rng.integers(1, 4)), colour, -1, cv2.LINE_AA)
        else:
            axes = (int(rng.integers(8, 40)), int(rng.integers(1, 3)))
            cv2.ellipse(img, p1, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
    return img


def _polygon(label: int, centre: Tuple[float, float], radius: float,
             angle: float) -> Optional[np.ndarray]:
    """Vertices (N, 2) of a square / triangle / star; None for a circle."""
    if label == 0:
        return None
    if label == 1:
        ang = angle + np.arange(4) * np.pi / 2 + np.pi / 4
        rad = np.full(4, radius)
    elif label == 2:
        ang = angle + np.arange(3) * 2 * np.pi / 3
        rad = np.full(3, radius)
    else:
        ang = angle + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
    return np.stack([centre[0] + rad * np.cos(ang), centre[1] + rad * np.sin(ang)], axis=1)


def _shape_mask(label: int, centre, radius: float, angle: float, size: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    poly = _polygon(label, centre, radius, angle)
    if poly is None:
        cv2.circle(
            mask, (int(round(centre[0] * 8)), int(round(centre[1] * 8))),
            int(round(radius * 8)),
            1,
            -1,
            cv2.LINE_8,
            shift=3)
    else:
        cv2.fillPoly(mask, [np.round(poly * 8).astype(np.int32)], 1, cv2.LINE_8, shift=3)
    return mask.astype(bool)


def draw_sample(rng: np.random.Generator,
                spec: DemoDatasetSpec) -> Tuple[np.ndarray, List[Dict], np.ndarray]:
    """One image: ``(uint8 RGB image, objects, uint8 label map)``.

    ``objects`` are dicts with ``label`` (0-based class), ``mask`` (bool, visible part),
    ``bbox`` (x, y, w, h of the visible part) and ``visible_fraction``. Objects are placed back
    to front by rejection sampling so that every object keeps at least ``1 - max_occlusion`` of
    its area visible.
    """
    size = spec.img_size
    img = _background(rng, size)
    wanted = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    placed: List[Dict] = []  # drawn order: later objects occlude earlier ones
    for _ in range(wanted * 15):
        if len(placed) == wanted:
            break
        label = int(rng.integers(len(CLASSES)))
        # log-uniform diameters give many small and some large objects
        diameter = math.exp(rng.uniform(math.log(spec.min_size), math.log(spec.max_size)))
        radius = diameter / 2
        margin = radius * 0.6
        centre = (float(rng.uniform(margin,
                                    size - margin)), float(rng.uniform(margin, size - margin)))
        mask = _shape_mask(label, centre, radius, float(rng.uniform(0, 2 * np.pi)), size)
        area = int(mask.sum())
        if area < 0.2 * spec.min_size**2:  # mostly outside the image
            continue
        # the new object goes on top: every earlier object loses its overlap with it
        ok = True
        for obj in placed:
            visible = obj['visible'] & ~mask
            if visible.sum() < (1 - spec.max_occlusion) * obj['area']:
                ok = False
                break
        if not ok:
            continue
        for obj in placed:
            obj['visible'] &= ~mask
        placed.append(dict(label=label, full=mask, visible=mask.copy(), area=area))

    labels = np.zeros((size, size), np.uint8)
    for obj in placed:  # back to front
        if rng.uniform() < spec.colour_hint:
            colour_id = obj['label'] + len(CLASSES) * int(rng.integers(2))
        else:
            colour_id = int(rng.integers(len(COLOURS)))
        colour = COLOURS[colour_id] * rng.uniform(0.8, 1.1)
        ys, xs = np.nonzero(obj['full'])
        # a linear shading across the object plus a little noise
        direction = rng.normal(size=2)
        shade = 1 + 0.25 * np.tanh(((xs - xs.mean()) * direction[0] +
                                    (ys - ys.mean()) * direction[1]) / (xs.std() + ys.std() + 1))
        img[ys, xs] = np.clip(colour[None, :] * shade[:, None], 0, 255)
        labels[obj['full']] = obj['label'] + 1
    img = cv2.GaussianBlur(img, (3, 3), 0.7)
    img += rng.normal(0, rng.uniform(3, 12), size=img.shape).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)

    objects = []
    for obj in placed:
        ys, xs = np.nonzero(obj['visible'])
        if len(xs) == 0:
            continue
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        objects.append(
            dict(
                label=obj['label'],
                mask=obj['visible'],
                bbox=[float(x0), float(y0), float(x1 - x0),
                      float(y1 - y0)],
                visible_fraction=len(xs) / obj['area']))
    return img, objects, labels


def _mask_polygons(mask: np.ndarray) -> List[List[float]]:
    """COCO polygons of a binary mask that rasterise back to it (outer contours).

    Contours are traced on the mask upsampled 2x, so they pass a quarter pixel outside the
    centres of the boundary pixels: pycocotools' rasteriser then gives back every pixel
    (mean IoU ~0.998 on the demo objects; tracing the pixel centres loses ~10%).
    """
    up = cv2.resize(mask.astype(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        if len(contour) < 3 or cv2.contourArea(contour) < 2:
            continue
        pts = (contour.reshape(-1, 2).astype(np.float64) + 0.5) / 2
        polygons.append([float(v) for v in pts.reshape(-1)])
    return polygons


# ------------------------------------------------------------------------------------- writing
def _write_split(root: str, split: str, num: int, spec: DemoDatasetSpec,
                 rng: np.random.Generator) -> Dict:
    img_dir = osp.join(root, 'images', split)
    seg_dir = osp.join(root, 'seg_labels', split)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(seg_dir, exist_ok=True)
    images, annotations = [], []
    for idx in range(num):
        img, objects, labels = draw_sample(rng, spec)
        name = f'{idx:06d}'
        cv2.imwrite(
            osp.join(img_dir, name + '.jpg'), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
            [cv2.IMWRITE_JPEG_QUALITY, 95])
        cv2.imwrite(osp.join(seg_dir, name + '.png'), labels)
        image_id = idx + 1
        images.append(
            dict(id=image_id, file_name=name + '.jpg', width=spec.img_size, height=spec.img_size))
        for obj in objects:
            polygons = _mask_polygons(obj['mask'])
            if not polygons:
                continue
            annotations.append(
                dict(
                    id=len(annotations) + 1,
                    image_id=image_id,
                    category_id=obj['label'] + 1,
                    bbox=obj['bbox'],
                    area=float(obj['mask'].sum()),
                    segmentation=polygons,
                    iscrowd=0))
    categories = [
        dict(id=i + 1, name=name, supercategory='shape') for i, name in enumerate(CLASSES)
    ]
    coco = dict(
        info=dict(description=f'orepa_mm synthetic shapes ({split})', version=str(spec.version)),
        images=images,
        annotations=annotations,
        categories=categories,
        licenses=[])
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    with open(osp.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
        json.dump(coco, f)
    return dict(images=len(images), objects=len(annotations))


def generate_demo_dataset(root: str = 'data/demo',
                          spec: Optional[DemoDatasetSpec] = None,
                          **kwargs) -> Dict:
    """Draw the dataset into ``root`` (replacing what is there) and return its ``meta.json``.

    ``spec`` or keyword arguments of :class:`DemoDatasetSpec` (``num_train``, ``seed``, ...)
    choose what is drawn. The files are written into a temporary folder beside ``root`` and
    moved into place at the end, so an interrupted run never leaves a half-written dataset.
    """
    spec = spec or DemoDatasetSpec(**kwargs)
    outputs = OutputSet('pass another data root')
    root = outputs.add(os.fspath(root), 'data root', kind='dir')
    outputs.check()
    with outputs.write() as staged:
        tmp = staged[root]
        # train and val come from independent streams of the same seed
        train_rng, val_rng = [
            np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(2)
        ]
        counts = dict(
            train=_write_split(tmp, 'train', spec.num_train, spec, train_rng),
            val=_write_split(tmp, 'val', spec.num_val, spec, val_rng))
        meta = dict(spec=asdict(spec), counts=counts, classes=list(CLASSES))
        with open(osp.join(tmp, 'meta.json'), 'w') as f:
            json.dump(meta, f, indent=1)
    return meta


def ensure_demo_dataset(root: str = 'data/demo',
                        spec: Optional[DemoDatasetSpec] = None,
                        **kwargs) -> Tuple[Dict, bool]:
    """Generate the dataset unless ``root`` already holds one drawn with the same arguments.

    Returns ``(meta, generated)``.
    """
    spec = spec or DemoDatasetSpec(**kwargs)
    meta_file = osp.join(root, 'meta.json')
    if osp.isfile(meta_file):
        try:
            with open(meta_file) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            meta = None
        if meta is not None and meta.get('spec') == asdict(spec):
            return meta, False
    return generate_demo_dataset(root, spec), True
