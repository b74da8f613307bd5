"""RecTok tokenizer: data, model, losses and training (SPEC.md §1-3).

Data (SPEC.md §1): ImageNet-style class folders with the ADM center crop, and a built-in synthetic data set
of procedurally drawn, class-labelled shapes (deterministic per index, any resolution) so that every stage
runs offline.
"""
import math
import os

import numpy as np
import torch
from PIL import Image

#################################################################################
#                                     Data                                      #
#################################################################################

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def center_crop_adm(image, size):
    """ADM's center crop (SPEC.md §1): halve with a BOX filter while the short side is >= 2*size, resize the
    short side to `size` with BICUBIC, then crop the centre size x size."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def to_tensor(arr):
    """uint8 HWC -> float CHW in [-1, 1], the range every network here reads (SPEC.md §0)."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 127.5 - 1.0


class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/<image>, classes sorted by name (ImageNet's train/val layout). Returns (image, label);
    the random flip is applied in the training loop, from a checkpointed generator."""

    def __init__(self, root, size):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data folder not found: {root} (expected root/<class>/<image files>)")
        self.size = size
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.classes:
            raise ValueError(f"{root} has no class sub-folders: expected root/<class>/<image files>, "
                             f"as ImageNet's train and val folders")
        self.samples = [(os.path.join(root, c, f), i) for i, c in enumerate(self.classes)
                        for f in sorted(os.listdir(os.path.join(root, c)))
                        if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not self.samples:
            raise ValueError(f"{root} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.num_classes = len(self.classes)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except Exception as e:
            raise RuntimeError(f"cannot read image {path}: {e}. Remove or replace the file.") from None
        return to_tensor(center_crop_adm(image, self.size)), label


#: the shape classes of the built-in data set
SHAPES = ("circle", "square", "triangle", "ring", "cross", "star", "bar", "crescent", "half-disk",
          "two-dots")


def _shape_mask(kind, u, v, radius):
    """Inside-test of one shape in its own rotated frame (u, v) with size `radius`."""
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    if kind == "circle":
        return r < radius
    if kind == "square":
        return np.maximum(abs(u), abs(v)) < 0.8 * radius
    if kind == "triangle":
        sector = np.mod(theta, 2 * np.pi / 3) - np.pi / 3
        return r * np.cos(sector) < radius * 0.5
    if kind == "ring":
        return abs(r - 0.75 * radius) < 0.25 * radius
    if kind == "cross":
        return ((abs(u) < radius / 3) & (abs(v) < radius)) | ((abs(v) < radius / 3) & (abs(u) < radius))
    if kind == "star":
        return r < radius * (0.55 + 0.45 * np.cos(5 * theta))
    if kind == "bar":
        return (abs(u) < radius) & (abs(v) < 0.25 * radius)
    if kind == "crescent":
        return (r < radius) & (np.hypot(u - 0.45 * radius, v) > 0.8 * radius)
    if kind == "half-disk":
        return (r < radius) & (u > 0)
    return (np.hypot(u - 0.5 * radius, v) < 0.42 * radius) | (np.hypot(u + 0.5 * radius, v) < 0.42 * radius)


def _background(rng, yy, xx):
    """Two nearby colours mixed by a random texture: gradient, stripes, checks or smooth blobs (low contrast,
    so that the shape, not the texture, is the salient object)."""
    c0 = rng.uniform(0, 1, 3)
    c1 = np.clip(c0 + rng.uniform(-0.3, 0.3, 3), 0, 1)
    kind = rng.integers(4)
    angle = rng.uniform(0, 2 * np.pi)
    d = xx * np.cos(angle) + yy * np.sin(angle)
    if kind == 0:
        w = (d + 1) / 2
    elif kind == 1:
        w = 0.5 + 0.5 * np.sin(d * rng.uniform(6, 20) + rng.uniform(0, 6))
    elif kind == 2:
        f = rng.uniform(3, 8)
        w = ((np.floor((xx + 1) * f) + np.floor((yy + 1) * f)) % 2) * 0.8 + 0.1
    else:
        w = sum(np.exp(-((xx - rng.uniform(-1, 1)) ** 2 + (yy - rng.uniform(-1, 1)) ** 2) / rng.uniform(0.05, 0.4))
                for _ in range(4))
        w = np.clip(w, 0, 1)
    return c0 * (1 - w[..., None]) + c1 * w[..., None], (c0 + c1) / 2


class SyntheticShapes(torch.utils.data.Dataset):
    """The built-in data set (DESIGN.md): a shape of one of 10 classes with random position, size, rotation
    and colour on a textured background. Image i is a pure function of (seed, split, i), at any size."""

    num_classes = len(SHAPES)

    def __init__(self, num_images, size, split="train", seed=0):
        self.n, self.size, self.seed = num_images, size, seed
        self.split = {"train": 0, "val": 1}[split]

    def __len__(self):
        return self.n

    def render(self, i):
        rng = np.random.default_rng([self.seed, self.split, i])
        label = i % self.num_classes
        s = 2 * self.size  # draw at 2x, then box-filter down: anti-aliased edges
        yy, xx = np.meshgrid(np.linspace(-1, 1, s), np.linspace(-1, 1, s), indexing="ij")
        image, bg_mean = _background(rng, yy, xx)
        colour = rng.uniform(0, 1, 3)
        while np.abs(colour - bg_mean).sum() < 0.6:
            colour = rng.uniform(0, 1, 3)
        radius = rng.uniform(0.35, 0.65)
        cy, cx = rng.uniform(-0.9 + radius, 0.9 - radius, 2)
        angle = rng.uniform(0, 2 * np.pi)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        mask = _shape_mask(SHAPES[label], u, v, radius)
        image = np.where(mask[..., None], colour, image)
        image = image.reshape(self.size, 2, self.size, 2, 3).mean(axis=(1, 3))
        return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), label

    def __getitem__(self, i):
        arr, label = self.render(i)
        return to_tensor(arr), label


def build_dataset(data, size, split="train", num_images=None, seed=0):
    """'synthetic' -> the built-in data set (num_images of them, default 10,000 train / 1,000 val);
    anything else is a class-folder root (num_images, if set, keeps an evenly spaced subset)."""
    if data == "synthetic":
        return SyntheticShapes(num_images or (10000 if split == "train" else 1000), size, split, seed)
    dataset = ImageFolder(data, size)
    if num_images and num_images < len(dataset):
        keep = np.linspace(0, len(dataset) - 1, num_images).round().astype(int).tolist()
        subset = torch.utils.data.Subset(dataset, keep)
        subset.num_classes = dataset.num_classes
        return subset
    return dataset
