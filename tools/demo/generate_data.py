"""Deterministic synthetic datasets that the real OpenMMLab pipelines read unchanged.

* ``coco/``: COCO instance format (boxes + polygon masks) -- circles, squares and triangles;
* ``ade/``: ADE20K layout (``images/{training,validation}/*.jpg``,
  ``annotations/{training,validation}/*.png``, label 0 = "other", reduce_zero_label semantics);
* ``cls/``: an image-folder classification set (``{train,val}/<class>/*.png``).

Shapes are large, flat-coloured objects on a grey textured background. Each class has its own
hue family (circles reddish, squares greenish, triangles bluish; brightness, saturation and hue
jittered per object) on top of its shape, so that a network trained from scratch -- no ImageNet
weights offline -- learns them within a few hundred CPU iterations; size, position, rotation and
the number of objects (1-5 per detection image, 1-3 per segmentation image) still vary.

    python tools/demo/generate_data.py --out data/demo [--num-train 64 --num-val 16 --size 256]
"""
import argparse
import json
import math
import shutil
from pathlib import Path
from typing import List, Tuple

import colorsys

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ('circle', 'square', 'triangle')
# ADE20K class ids (1-based in the label files) used for the segmentation demo: the shapes are
# drawn as "wall", "building" and "sky" (ids 1, 2, 3); 0 = "other" is ignored by the metric.
ADE_IDS = {'circle': 1, 'square': 2, 'triangle': 3}


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> List[Tuple[float, float]]:
    if kind == 'circle':
        n, start = 32, 0.
    elif kind == 'square':
        n, start = 4, angle + math.pi / 4
    else:
        n, start = 3, angle - math.pi / 2
    return [(cx + r * math.cos(start + 2 * math.pi * i / n),
             cy + r * math.sin(start + 2 * math.pi * i / n)) for i in range(n)]


# Hue (degrees) of each class; every object jitters it by up to +-HUE_JITTER degrees.
CLASS_HUES = {'circle': 0., 'square': 120., 'triangle': 230.}
HUE_JITTER = 20.


def _colour(rng: np.random.RandomState, kind: str) -> Tuple[int, int, int]:
    hue = (CLASS_HUES[kind] + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 360 / 360
    r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _background(rng: np.random.RandomState, size: int) -> Image.Image:
    # low-saturation grey: the class hues stand out from it
    base = rng.randint(60, 190) + rng.randint(-8, 9, size=3)
    noise = rng.randint(-25, 25, size=(size, size, 3))
    grad = np.linspace(-20, 20, size)[None, :, None]
    img = np.clip(base[None, None] + noise + grad, 0, 255).astype(np.uint8)
    return Image.fromarray(img)


def _sample_objects(rng, size: int, max_objects: int):
    objs = []
    for _ in range(rng.randint(1, max_objects + 1)):
        for _attempt in range(20):
            r = rng.uniform(0.12, 0.24) * size
            cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
            # keep objects mostly apart so that every instance stays visible
            if all(math.hypot(cx - o[1], cy - o[2]) > 0.8 * (r + o[3]) for o in objs):
                kind = SHAPES[rng.randint(len(SHAPES))]
                colour = _colour(rng, kind)
                objs.append((kind, cx, cy, r, rng.uniform(0, 2 * math.pi), colour))
                break
    return objs


def _render(rng, size, max_objects):
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    objs = _sample_objects(rng, size, max_objects)
    polys = []
    for kind, cx, cy, r, angle, colour in objs:
        poly = _polygon(kind, cx, cy, r, angle)
        draw.polygon(poly, fill=colour)
        polys.append((kind, poly))
    return img, polys


def make_coco(out: Path, num_train: int, num_val: int, size: int, seed: int = 0,
              max_objects: int = 5) -> None:
    rng = np.random.RandomState(seed)
    categories = [dict(id=i + 1, name=n, supercategory='shape') for i, n in enumerate(SHAPES)]
    for split, n in (('train', num_train), ('val', num_val)):
        (out / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            img, polys = _render(rng, size, max_objects)
            name = f'{split}_{i:05d}.png'
            img.save(out / split / name)
            images.append(dict(id=i + 1, file_name=name, width=size, height=size))
            for kind, poly in polys:
                xs, ys = [p[0] for p in poly], [p[1] for p in poly]
                x0, y0 = max(min(xs), 0), max(min(ys), 0)
                x1, y1 = min(max(xs), size), min(max(ys), size)
                # area of the polygon (shoelace), as COCO stores the mask area
                area = 0.5 * abs(sum(xs[j] * ys[j - 1] - xs[j - 1] * ys[j] for j in range(len(xs))))
                annotations.append(dict(
                    id=len(annotations) + 1, image_id=i + 1,
                    category_id=SHAPES.index(kind) + 1,
                    segmentation=[[round(c, 2) for p in poly for c in p]],
                    bbox=[round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    area=round(area, 2), iscrowd=0))
        (out / 'annotations').mkdir(parents=True, exist_ok=True)
        with open(out / 'annotations' / f'instances_{split}.json', 'w') as f:
            json.dump(dict(images=images, annotations=annotations, categories=categories), f)


def make_ade(out: Path, num_train: int, num_val: int, size: int, seed: int = 1) -> None:
    rng = np.random.RandomState(seed)
    for split, n in (('training', num_train), ('validation', num_val)):
        (out / 'images' / split).mkdir(parents=True, exist_ok=True)
        (out / 'annotations' / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, polys = _render(rng, size, max_objects=3)
            label = Image.new('L', (size, size), 0)
            ldraw = ImageDraw.Draw(label)
            for kind, poly in polys:
                ldraw.polygon(poly, fill=ADE_IDS[kind])
            name = f'ADE_{split}_{i:08d}'
            img.save(out / 'images' / split / f'{name}.jpg', quality=95)
            label.save(out / 'annotations' / split / f'{name}.png')


def make_cls(out: Path, num_train: int, num_val: int, size: int, seed: int = 2) -> None:
    rng = np.random.RandomState(seed)
    for split, n in (('train', num_train), ('val', num_val)):
        for i in range(n):
            kind = SHAPES[i % len(SHAPES)]
            img = _background(rng, size)
            r = rng.uniform(0.25, 0.4) * size
            cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
            colour = _colour(rng, kind)
            ImageDraw.Draw(img).polygon(
                _polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=colour)
            (out / split / kind).mkdir(parents=True, exist_ok=True)
            img.save(out / split / kind / f'{i:05d}.png')


#: bump when the rendering changes, so that existing demo data is regenerated
DATA_VERSION = 3
MAKERS = {'coco': make_coco, 'ade': make_ade, 'cls': make_cls}


def generate(out, tasks=('coco', 'ade', 'cls'), num_train=64, num_val=16, size=256) -> None:
    """Write the datasets under ``out`` (skips a task whose folder already has its marker)."""
    out = Path(out)
    for task in tasks:
        target = out / task
        marker = target / f'.done_v{DATA_VERSION}_{num_train}_{num_val}_{size}'
        if marker.exists():
            continue
        # a different version / size: start from an empty folder (stale images would otherwise
        # stay in the image-folder set)
        shutil.rmtree(target, ignore_errors=True)
        MAKERS[task](target, num_train, num_val, size)
        marker.touch()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='data/demo')
    parser.add_argument('--tasks', nargs='+', default=list(MAKERS), choices=list(MAKERS))
    parser.add_argument('--num-train', type=int, default=64)
    parser.add_argument('--num-val', type=int, default=16)
    parser.add_argument('--size', type=int, default=256)
    args = parser.parse_args()
    generate(args.out, args.tasks, args.num_train, args.num_val, args.size)
    print(f'synthetic data in {args.out}: {", ".join(args.tasks)}')


if __name__ == '__main__':
    main()
