"""FID, Inception Score and precision/recall, from scratch, matching the ADM evaluator and torch-fidelity.

The FID Inception is the 2015-12-05 TensorFlow graph ported to torch (pytorch-fid's and torch-fidelity's
`pt_inception-2015-12-05-6726825d.pth`, identical key names), with the graph's quirks written where they
happen: average pools that ignore padding in the A, C and first E blocks, a MAX pool in the last E block,
a 1008-way classifier. Two input pipelines:
  * "tf" (default; the ADM evaluator and torch-fidelity): uint8 -> float -> TensorFlow-1 bilinear resize
    to 299 -> (x - 128) / 128;
  * "pytorch-fid": uint8 / 255 -> torch bilinear resize to 299 -> 2x - 1.
The Frechet distance is computed in float64 through a symmetric eigenvalue problem
(tr sqrt(S1 S2) = sum sqrt(eig(F^T S2 F)) with S1 = F F^T), not scipy's sqrtm; the Inception Score follows
torch-fidelity (10 splits, rows permuted by RandomState(2020)).

Run:
    python fid.py samples.npz /refs/VIRTUAL_imagenet256_labeled.npz        # FID
    python fid.py runs/samples/images ref.npz --is --pr                    # a folder; IS, precision/recall
    python fid.py /imagenet/val --save-stats runs/val_stats.npz --json runs/val.json   # a set's statistics
    torchrun --nproc_per_node=8 fid.py samples.npz ref.npz                 # features on many ranks

Each argument is a folder of images, an image .npz (`arr_0`, N x H x W x 3 uint8) or a statistics .npz
(`mu`, `sigma`, as the ADM reference batches and pytorch-fid; two of them need no Inception). Prints the
metrics and writes them to --json (default: fid_metrics.json beside the first argument; checked, like
--save-stats, before the Inception runs). A folder's images may differ in size: each is resized to 299 as
it is, uncropped (center-crop them first for statistics comparable with the ADM reference batches).
Imports nothing from the rest of the project.
"""
import argparse
import collections
import contextlib
import json
import os
import sys
import warnings
import zipfile

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")

#################################################################################
#                     The FID Inception (TF graph of 2015-12-05)                #
#################################################################################


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, as the TF graph) -> ReLU; torchvision's names."""

    def __init__(self, c_in, c_out, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def avg_pool(x):
    # The TF graph's 3x3 average pools do not count the zero padding.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool(x))], dim=1)


class InceptionB(nn.Module):
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], dim=1)


class InceptionC(nn.Module):
    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(avg_pool(x))], dim=1)


class InceptionD(nn.Module):
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], dim=1)


class InceptionE(nn.Module):
    """`max_pool`: the graph's LAST E block (Mixed_7c) pools its pool branch with a max, not an average."""

    def __init__(self, c_in, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pool)], dim=1)


@contextlib.contextmanager
def exact_fp32():
    """Full fp32 matmuls and convolutions, whatever the process chose (a trainer's TF32, or PyTorch's
    default TF32 for cuDNN convolutions): the features must be the reference implementations' fp32 ones."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


class FIDInception(nn.Module):
    """InceptionV3 as the FID graph: 299 x 299 inputs in [-1, 1] -> (pool3 (B, 2048), logits (B, 1008)
    without the bias, as torch-fidelity's 'logits_unbiased' that the Inception Score uses)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):
        with exact_fp32():
            return self.features(x)

    def features(self, x):
        x = x.contiguous(memory_format=torch.channels_last)  # NHWC: ~1.7x faster convolutions on CPU
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)
        pool3 = x.mean(dim=(2, 3))
        return pool3, pool3 @ self.fc.weight.T

    def load(self, weights=None):
        """pt_inception-2015-12-05 from a local path or a URL (see `download`), strict key matching."""
        weights = weights or FID_WEIGHTS_URL
        try:
            path = download(weights) if weights.startswith(("http://", "https://")) else weights
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RuntimeError(f"could not load the FID Inception weights from {weights} ({e}). Download "
                               f"{FID_WEIGHTS_URL} and pass its path with --inception-weights") from None
        missing, unexpected = self.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights} is not the FID Inception: missing {missing[:10]}, "
                             f"unexpected {unexpected[:10]}")
        return self.to(memory_format=torch.channels_last).eval().requires_grad_(False)


def download(url):
    """The file at `url` in torch.hub's cache ($TORCH_HOME/hub/checkpoints), downloaded by the first process
    of each machine while the others wait (every process calls this), not by all of them at once."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.hub.download_url_to_file(url, path, progress=False)
    if dist.is_initialized():
        dist.barrier()
    return path


#################################################################################
#                    Input pipelines: TF1 resize and pytorch-fid                #
#################################################################################


def resize_tf1(x, size):
    """TensorFlow 1's bilinear resize (align_corners False, no half-pixel centres): source coordinate
    = output index * in/out, so the grid is anchored at the top-left corner, unlike torch's. Written as
    two interpolation matrices, out = Ry x Rx^T, which is fast on any device."""
    def weights(n_in, n_out):
        src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        frac = src - lo
        r = torch.zeros(n_out, n_in, dtype=torch.float64)
        r[torch.arange(n_out), lo] += 1 - frac
        r[torch.arange(n_out), hi] += frac
        return r.to(x.device, x.dtype)

    return weights(x.shape[-2], size[0]) @ x @ weights(x.shape[-1], size[1]).T


def preprocess(images, mode="tf"):
    """uint8 (B, 3, H, W) -> the network's 299 x 299 input."""
    if images.dtype != torch.uint8:
        raise TypeError("FID inputs must be uint8 images (B, 3, H, W); round and cast them first")
    x = images.float()
    if mode == "tf":
        return (resize_tf1(x, (299, 299)) - 128) / 128
    if mode == "pytorch-fid":
        x = F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1
    raise ValueError(f"unknown input pipeline {mode!r}: 'tf' or 'pytorch-fid'")


#################################################################################
#                   Features from folders, .npz files and iterators             #
#################################################################################

#: what counts as an image, in any letter case, for fid.py and every stage of the project (a GIF is its first frame)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def world_info():
    distributed = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)


def list_images(folder):
    """Every image under `folder` at any depth, sorted by path, and the other files (left out, and said)."""
    images, others = [], []
    for root, dirs, files in os.walk(folder, followlinks=True):
        for f in files:
            (images if f.lower().endswith(IMAGE_EXTENSIONS) else others).append(os.path.join(root, f))
    return sorted(images), sorted(others)


def not_images(others):
    """'' or a note on the files a folder holds beside its images, e.g. '; skipped 3 files that are not
    images (.txt 2, no extension 1)'."""
    if not others:
        return ""
    kinds = collections.Counter(os.path.splitext(path)[1].lower() or "no extension" for path in others)
    listed = ", ".join(f"{k} {n}" for k, n in kinds.most_common(6))
    return f"; skipped {len(others)} files that are not images ({listed})"


def load_rgb(path):
    """An image file as 8-bit RGB, as the standard evaluators read it (PIL's convert("RGB"): palette, alpha,
    greyscale and CMYK files, a GIF's first frame), except 16-bit greyscale (PNG/TIFF modes I;16 and I),
    which is scaled to 8 bits: PIL's conversion clips it, which turns most pixels white."""
    with Image.open(path) as im:
        if im.mode.startswith("I"):
            deep = np.asarray(im, dtype=np.float64)
            return Image.fromarray((deep * (255 / 65535)).round().clip(0, 255).astype(np.uint8)).convert("RGB")
        return im.convert("RGB")


def folder_images(folder):
    """A folder's images for the Inception, with a note of what was left out (on stderr: stdout is the JSON)."""
    files, others = list_images(folder)
    if not files:
        raise ValueError(f"{folder} has no images ({', '.join(IMAGE_EXTENSIONS)}){not_images(others)}")
    if world_info()[0] == 0:
        print(f"{folder}: {len(files)} images{not_images(others)}", file=sys.stderr)
    return files


def read_image(path):
    try:
        return torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1)  # H x W x 3 -> 3 x H x W
    except Exception as e:
        raise RuntimeError(f"cannot read image {path}: {e}") from None


def read_batch(files):
    """uint8 (B, 3, H, W), or a list of (3, H, W) images when their sizes differ (a folder such as ImageNet's
    val): each is then resized to 299 on its own, which is what a batch does to each of its images."""
    images = [read_image(f) for f in files]
    return torch.stack(images) if len({im.shape for im in images}) == 1 else images


def image_batches(source, batch_size):
    """This rank's contiguous shard of a folder or an image .npz, as uint8 (B, 3, H, W) batches; also
    returns the total count. Any other iterable of uint8 batches passes through (the caller shards it)."""
    rank, world = world_info()
    if isinstance(source, str) and os.path.isdir(source):
        files = folder_images(source)
        n, get = len(files), (lambda lo, hi: read_batch(files[lo:hi]))
    elif isinstance(source, str) and source.endswith(".npz"):
        images = npz_images(source)  # read-only memory map: each batch is a copy
        # B x H x W x 3 -> B x 3 x H x W
        n, get = len(images), (lambda lo, hi: torch.from_numpy(np.array(images[lo:hi])).permute(0, 3, 1, 2))
    elif isinstance(source, str):
        raise FileNotFoundError(f"{source}: not a folder of images or an .npz file")
    else:
        return source, None
    lo, hi = rank * n // world, (rank + 1) * n // world
    return (get(s, min(hi, s + batch_size)) for s in range(lo, hi, batch_size)), n


def npz_images(path):
    """The `arr_0` of an image .npz without reading it all: np.savez stores members uncompressed, so the
    array is memory-mapped in place and each rank reads only its shard (50,000 images at 256 px are
    10 GB). A compressed file (np.savez_compressed) cannot be mapped and is read whole."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        if "arr_0.npy" not in names:
            raise ValueError(f"{path} has no 'arr_0' image array (members: {names})")
        info = z.getinfo("arr_0.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return np.load(path)["arr_0"]
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the member's local header: its name and extra field lengths are at 26 and 28
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(version, np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:  # mapping Python objects would read pointers from the file (it crashed)
        raise ValueError(f"{path}: its arr_0 holds Python objects ({dtype}), not images: save a uint8 array "
                         f"(N, H, W, 3)")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


@torch.no_grad()
def features(model, source, batch_size=100, mode="tf", device="cpu"):
    """pool3 features and unbiased logits of every image, gathered from all ranks in index order."""
    batches, n = image_batches(source, batch_size)
    pools, logits = [], []
    for images in batches:
        if isinstance(images, list):  # a folder's images of several sizes, each resized on its own
            x = torch.cat([preprocess(im[None].to(device), mode) for im in images])
        else:
            x = preprocess(images.to(device), mode)
        pool3, logit = model(x)
        pools.append(pool3.double().cpu())
        logits.append(logit.double().cpu())
    pool = torch.cat(pools) if pools else torch.zeros(0, 2048, dtype=torch.float64)
    logit = torch.cat(logits) if logits else torch.zeros(0, 1008, dtype=torch.float64)
    return gather(pool), gather(logit)


def gather(x):
    """Concatenate every rank's rows in rank order (shards may be uneven)."""
    world = world_info()[1]
    if world == 1:
        return x.numpy()
    parts = [None] * world
    dist.all_gather_object(parts, x)
    return torch.cat(parts).numpy()


#################################################################################
#                        Statistics, FID, IS, precision/recall                  #
#################################################################################


def statistics(feats):
    """mu and sigma (unbiased covariance, as np.cov) in float64."""
    feats = np.asarray(feats, dtype=np.float64)
    if len(feats) < 2:
        raise ValueError(f"FID needs at least 2 images, got {len(feats)}")
    if not np.isfinite(feats).all():
        raise ValueError("non-finite Inception features: check the images (NaN pixels?)")
    if len(feats) <= feats.shape[1]:
        warnings.warn(f"Frechet statistics from {len(feats)} samples of {feats.shape[1]}-d features: the "
                      f"covariance is singular and the distance is strongly biased (upward, and it shrinks "
                      f"as samples are added); compare numbers only at equal counts, and use >= 10,000 "
                      f"(the standard is 50,000)", stacklevel=2)
    mu = feats.mean(axis=0)
    centred = feats - mu
    return mu, centred.T @ centred / (len(feats) - 1)


def load_statistics(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"statistics file not found: {path} (an .npz with mu and sigma: an ADM "
                                f"reference batch, or `fid.py IMAGES --save-stats FILE`)")
    stats = np.load(path)
    if "mu" not in stats.files or "sigma" not in stats.files:
        raise ValueError(f"{path} is not a statistics file: it needs 'mu' and 'sigma' (has {stats.files})")
    try:
        mu, sigma = stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64)
    except ValueError as e:  # numpy refuses arrays of Python objects (allow_pickle=False)
        raise ValueError(f"{path}: mu and sigma must be arrays of numbers ({e})") from None
    check_statistics(path, mu, sigma)
    return mu, sigma


def check_statistics(path, mu, sigma):
    """mu (D,) and sigma a covariance (D, D): finite, symmetric, positive semi-definite. Anything else made
    a Frechet distance such as -22733.6 or nan, reported as a score."""
    d = len(mu)
    if mu.ndim != 1 or sigma.shape != (d, d):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a mean (D,) and a covariance (D, D)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu or sigma holds nan or inf")
    scale = np.abs(sigma).max(initial=0.0)
    if not np.allclose(sigma, sigma.T, rtol=0, atol=1e-6 * scale):
        raise ValueError(f"{path}: sigma is not symmetric, so it is no covariance")
    lowest = np.linalg.eigvalsh(sigma).min(initial=0.0)
    if lowest < -1e-6 * scale:
        raise ValueError(f"{path}: sigma has negative eigenvalues (down to {lowest:.3g}), so it is no covariance")


def sqrt_psd(s):
    """Square root of a symmetric positive semi-definite matrix; negative rounding noise is clipped."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T, w.min()


def congruence(s1, s2):
    """F^T S2 F for some F with F F^T = S1: the lower Cholesky factor when S1 is positive definite (cheap,
    and triangular products cost half), else the PSD square root (rank-deficient covariances: fewer
    samples than dimensions, constant features). Also returns S1's smallest eigenvalue (NaN when the
    Cholesky succeeded, which proves S1 > 0)."""
    try:
        f = np.linalg.cholesky(s1)
    except np.linalg.LinAlgError:
        root, min1 = sqrt_psd(s1)
        return root @ s2 @ root, min1
    s2f = scipy.linalg.blas.dtrmm(1.0, f, s2, side=1, lower=1)  # S2 F
    return scipy.linalg.blas.dtrmm(1.0, f, s2f, lower=1, trans_a=1), np.nan  # F^T (S2 F)


def frechet_distance(mu1, sigma1, mu2, sigma2, diagnostics=False):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), in float64. With S1 = F F^T, the symmetric
    F^T S2 F has the eigenvalues of S1 S2, so a Cholesky and one symmetric eigenvalue solve replace
    scipy's (much slower, non-symmetric) sqrtm."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}")
    product, min1 = congruence(sigma1, sigma2)
    eig = scipy.linalg.eigh(product, eigvals_only=True, check_finite=False)
    tr_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()  # tr sqrt(S1 S2); negative rounding noise clipped
    fid = float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)
    if not diagnostics:
        return fid
    # pytorch-fid's safeguards, reported instead of acted on: negative eigenvalues beyond rounding say
    # that a covariance is not PSD (too few samples, or corrupted features).
    return fid, {"min_eig_sigma1": float(min1), "min_eig_product": float(eig.min()),
                 "negative_mass": float(-np.clip(eig, None, 0).sum())}


def inception_score(logits, splits=10, seed=2020):
    """torch-fidelity's IS: rows permuted by RandomState(seed), float64 softmax, `splits` contiguous
    splits, exp(mean KL(p(y|x) || p(y))) per split; mean and population std over the splits."""
    if len(logits) < splits:
        raise ValueError(f"the Inception Score needs at least {splits} images (one per split), got {len(logits)}")
    logits = np.asarray(logits, dtype=np.float64)[np.random.RandomState(seed).permutation(len(logits))]
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    n, scores = len(p), []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        kl = (part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def knn_radii(feats, k=3, chunk=1024):
    """Distance of each feature to its k-th nearest neighbour in the same set (itself excluded)."""
    f = torch.from_numpy(np.asarray(feats, dtype=np.float32))
    return torch.cat([torch.cdist(f[s:s + chunk], f).kthvalue(k + 1, dim=1).values
                      for s in range(0, len(f), chunk)])


def coverage(queries, reference, radii, chunk=1024):
    """Fraction of queries inside at least one reference ball (the ADM evaluator's manifold test)."""
    q, r = (torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in (queries, reference))
    inside = [(torch.cdist(q[s:s + chunk], r) <= radii[None]).any(dim=1) for s in range(0, len(q), chunk)]
    return torch.cat(inside).float().mean().item()


def precision_recall(sample_feats, ref_feats, k=3):
    """Improved precision (samples on the reference manifold) and recall (references on the sample
    manifold), k = 3 nearest neighbours, as the ADM evaluator."""
    return {"precision": coverage(sample_feats, ref_feats, knn_radii(ref_feats, k)),
            "recall": coverage(ref_feats, sample_feats, knn_radii(sample_feats, k))}


#################################################################################
#                                      CLI                                      #
#################################################################################


def statistics_members(source):
    """The members of `source` if it is statistics, else None. An .npz with `mu` and `sigma` is statistics
    whatever else it holds: the ADM reference batches store the statistics of the whole data set beside a
    10,000-image `arr_0`, which serves precision/recall only."""
    members = set(np.load(source).files) if source.endswith(".npz") and os.path.isfile(source) else set()
    return members if {"mu", "sigma"} <= members else None


def describe(source, model, args, device, need_images=False):
    """A source -> (mu, sigma, features or None, logits or None, number of images read or None); a statistics
    file's `arr_0` is read only for precision/recall (`need_images`)."""
    members = statistics_members(source)
    if members is not None:
        with_images = need_images and "arr_0" in members
        feats = features(model, source, args.batch_size, args.mode, device)[0] if with_images else None
        return (*load_statistics(source), feats, None, None)
    feats, logits = features(model, source, args.batch_size, args.mode, device)
    return (*statistics(feats), feats, logits, len(feats))


def write_atomically(path, write):
    """write(f) into a temporary file beside `path`, then os.replace: a run killed while writing never
    leaves a truncated file in place of the previous one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_writable(path, flag):
    """Before any feature is computed: `path`'s folder exists (made if missing) and takes a file, so that
    a read-only folder (the default --json lies beside the first source, e.g. a read-only data set) fails
    now, not after an Inception pass over 50,000 images."""
    folder = os.path.dirname(os.path.abspath(path))
    test = os.path.join(folder, f".write_test{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        open(test, "wb").close()
        os.remove(test)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path} ({e.strerror}): pass {flag} a writable path") from None


def setup_device():
    """torchrun's process group (NCCL on CUDA, gloo on the CPU) and this process's device. Each rank is made
    current on its own GPU: NCCL's object gather of the features runs on the current device, which is GPU 0
    for every rank otherwise."""
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def check_sources(p, args):
    """What the sources cannot give fails before the Inception is loaded or any feature computed. Returns
    whether any source's images are read (two statistics files need no Inception)."""
    if len(args.sources) > 2:
        p.error("give one source (statistics, IS) or two (FID)")
    missing = [s for s in args.sources if not os.path.exists(s)]
    if missing:
        p.error(f"{' '.join(missing)} not found: a source is a folder of images, an image .npz (arr_0) or a "
                f"statistics .npz (mu, sigma)")
    if args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size}: must be at least 1")
    members = [statistics_members(s) for s in args.sources]
    if args.inception_score and members[0] is not None:
        p.error(f"--is needs images: {args.sources[0]} holds statistics (mu, sigma)")
    if args.pr and (len(args.sources) < 2 or any(m is not None and "arr_0" not in m for m in members)):
        p.error("--pr compares two sources' images: give two, each images or a reference batch with arr_0")
    return args.pr or any(m is None for m in members)


def main(argv=None):
    class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """The docstring as written, and each flag's default."""

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("sources", nargs="+", help="one or two: folder, image .npz, or statistics .npz")
    p.add_argument("--save-stats", default=None, help="write the first source's mu/sigma to this .npz")
    p.add_argument("--is", dest="inception_score", action="store_true", help="Inception Score of the first")
    p.add_argument("--pr", action="store_true", help="precision/recall (k=3) of the first against the second")
    p.add_argument("--mode", default="tf", choices=["tf", "pytorch-fid"], help="input pipeline")
    p.add_argument("--inception-weights", default=None, help="pt_inception-2015-12-05 path or URL")
    p.add_argument("--batch-size", type=int, default=100, help="per process")
    p.add_argument("--json", default=None, help="where to write the metrics")
    args = p.parse_args(argv)
    reads_images = check_sources(p, args)
    out = args.json or os.path.join(os.path.dirname(os.path.abspath(args.sources[0])), "fid_metrics.json")
    # --save-stats is named as np.savez names a path: .npz appended if missing
    stats_path = args.save_stats and args.save_stats + ("" if args.save_stats.endswith(".npz") else ".npz")
    device = setup_device()
    rank, _ = world_info()
    if rank == 0:
        check_writable(out, "--json")
        if stats_path:
            check_writable(stats_path, "--save-stats")
    model = FIDInception().load(args.inception_weights).to(device) if reads_images else None
    first = describe(args.sources[0], model, args, device, args.pr)
    metrics = {"sources": args.sources, "mode": args.mode, "num_images": {args.sources[0]: first[4]}}
    if stats_path and rank == 0:
        write_atomically(stats_path, lambda f: np.savez(f, mu=first[0], sigma=first[1]))
    if len(args.sources) == 2:
        second = describe(args.sources[1], model, args, device, args.pr)
        metrics["num_images"][args.sources[1]] = second[4]
        metrics["fid"], metrics["fid_diagnostics"] = frechet_distance(*first[:2], *second[:2], diagnostics=True)
        if args.pr:
            metrics.update(precision_recall(first[2], second[2]))
    if args.inception_score:
        metrics["inception_score"], metrics["inception_score_std"] = inception_score(first[3])
    if rank == 0:
        print(json.dumps({k: v for k, v in metrics.items() if k != "fid_diagnostics"}, indent=1))
        write_atomically(out, lambda f: f.write(json.dumps(metrics, indent=2).encode()))
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
