"""Stage 0, the ground floor: the images and the teacher the tokenizer learns from, and the run plumbing
every stage imports.

RecTok aligns the semantic decoder's prediction from the noisy latent z_tau with a teacher's patch tokens
(FSD at visible positions, RAD at masked ones). This file owns that teacher, so tokenizer.py only asks
`Teacher(images) -> (B, L, D) targets` and never needs to know where the features come from:

  * DINOv3 ViT-S/B/L with patch 16 (4 registers, RoPE, LayerScale): the released default is ViT-L/16.
  * DINOv2 ViT-S/B/L/g with patch 14, with or without 4 registers (fed at (img/16)*14 px, so it also
    yields the tokenizer's h x w grid).
  * A stand-in teacher: a small ViT trained here as a classifier on the data at hand, for the built-in
    synthetic data (no VFM covers it) and for new domains.

All of them are one plain-torch ViT (`DinoViT`) whose parameter names follow Meta's checkpoints. Official
weights load with strict key matching from Meta's `.pth` files or from the Hugging Face safetensors layout
(read by a ~30-line reader below, no extra package), from a local path or a URL (cached by torch.hub).

Contents, top to bottom (every other file imports from here; of ours, this file imports fid.py alone,
for its one rule of what an image file is):
  1. Transformer parts every net shares (`Attention`, `rotate_adjacent`, `SwiGLU`, `run_blocks`), the
     DINOv2/DINOv3 ViT, its checkpoint layouts, the Teacher, and the stand-in teacher's model.
  2. Image data: class folders with ADM's center crop, the built-in shapes (`build_dataset`, `train_val`).
  3. Run plumbing, which a port replaces: processes, logging, atomic writes and run folders (one run per
     folder), checkpoint loading, EMA, the resumable sampler, micro-batches, preemption, the run skeleton
     (`Run`), `--bench`, and the command line: presets (`parse_with_preset`), the one rule for a flag that
     acts only under some setting (`only_with`), the checks that span flags (`refuse`).
  4. The stand-in teacher's training run and main().

Run:
    python distill.py                                   # stand-in teacher on the built-in data (tiny)
    python distill.py --data /path/to/class_folders --out runs/teacher
    torchrun --nproc_per_node=8 distill.py --data DIR --preset paper
    python distill.py check dinov3_vitl16 --weights FILE    # load official weights, print feature stats

Writes (stand-in): OUT/latest.pt (resumable) and OUT/teacher.pt, a self-describing checkpoint
{"kind": "teacher", "config", "model", "ema", "step", "epoch", "global_batch", "args", "accuracy",
"target_mean", "target_std"} that tokenizer.py loads with
`--teacher standin --teacher-weights OUT/teacher.pt` (the default).
"""
import argparse
import atexit
import concurrent.futures
import contextlib
import copy
import datetime
import errno
import functools
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import socket
import statistics
import struct
import sys
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from PIL import Image

import fid


#################################################################################
#      Transformer parts every net shares: attention, RoPE rotation, SwiGLU     #
#################################################################################


def run_blocks(blocks, x, *args, checkpoint=False):
    """x through each block in turn. With `checkpoint` (--grad-checkpoint, training only) a block keeps
    just its input for backward and recomputes its activations there: a block's attention and MLP
    intermediates are most of a step's memory, so this trades about a third more compute for a batch
    that fits. The blocks draw no random numbers, so the recomputation is exact."""
    for block in blocks:
        x = torch.utils.checkpoint.checkpoint(block, x, *args, use_reentrant=False) if checkpoint else block(x, *args)
    return x


def enable_grad_checkpoint(model, on=True):
    """--grad-checkpoint: every transformer of `model` (those with a `grad_checkpoint` switch) recomputes its
    blocks' activations in backward (run_blocks)."""
    for m in model.modules():
        if hasattr(m, "grad_checkpoint"):
            m.grad_checkpoint = on


class Attention(nn.Module):
    """Multi-head self-attention with one qkv Linear (bias) and scaled_dot_product_attention (flash /
    memory-efficient kernels on CUDA). `rotate`, if given, is the position code applied to q and k
    (B, heads, N, head_dim): every net of the project (DINO, RecTok, DiT^DH) shares this module and
    differs only there."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, rotate=None):
        B, N, D = x.shape
        # the qkv split: B x N x 3D -> B x N x 3 x heads x d -> 3 x B x heads x N x d
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if rotate is not None:
            q, k = rotate(q).to(v.dtype), rotate(k).to(v.dtype)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # B x heads x N x d -> B x N x D


def rotate_adjacent(x):
    """The released rotate_half pairs ADJACENT channels: (x_2i, x_2i+1) -> (-x_2i+1, x_2i). With the [f, f]
    frequency layout the two channels of a pair turn by different angles: not a true rotation, but it is
    what the released weights were trained with (`models/rectok.py`)."""
    x = x.unflatten(-1, (-1, 2))  # ... x d -> ... x d/2 x 2: the adjacent pairs
    return torch.stack((-x[..., 1], x[..., 0]), dim=-1).flatten(-2)


class SwiGLU(nn.Module):
    """Linear(D, 2h) split into (a, b), out = Linear(h, D)(silu(a) * b)."""

    def __init__(self, width, hidden):
        super().__init__()
        self.w12 = nn.Linear(width, 2 * hidden)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


def swiglu(width):
    """SwiGLU with hidden int(2/3 * 4D) (2048 for D = 768), as RecTok and DiT^DH use it."""
    return SwiGLU(width, int(2 / 3 * 4 * width))


def init_weights(module):
    """Linear and Conv weights trunc_normal(0.02), biases 0: DINO's init and RecTok's (`models/rectok.py`)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


#################################################################################
#          The teacher's ViT: DINOv2 / DINOv3 in Meta's parameter names         #
#################################################################################


def dinov3_rope(grid_h, grid_w, head_dim, theta, rescale=None, device=None):
    """DINOv3's 2D RoPE table (cos, sin), each (grid_h*grid_w, head_dim), made on `device` (a table copied
    from host memory at every forward would make each training step wait for the GPU).

    Patch-centre coordinates in [-1, 1]; frequencies 1/theta^(4k/head_dim), k < head_dim/4; the angles
    are laid out [row angles | column angles] and tiled twice. `rescale` (a number, or a one-element CPU
    tensor) multiplies the coordinates: DINOv3's training-time augmentation, which the released RecTok run
    kept on (`utils/foundation_models.py`)."""
    ys = (torch.arange(grid_h, dtype=torch.float32, device=device) + 0.5) / grid_h
    xs = (torch.arange(grid_w, dtype=torch.float32, device=device) + 0.5) / grid_w
    # gh x gw x 2 -> (gh gw) x 2
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1) * 2.0 - 1.0
    if rescale is not None:
        coords = coords * float(rescale)
    inv_freq = 1.0 / theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32, device=device)
    # (gh gw) x 2 x d/4 -> (gh gw) x d/2, tiled to (gh gw) x d
    angles = (2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]).flatten(1, 2).tile(2)
    return angles.cos(), angles.sin()


def dinov3_rotate(rope, num_prefix):
    """DINOv3's RoPE on the patch tokens only (CLS and registers pass), in fp32 as the references."""
    cos, sin = rope

    def rotate(t):
        patches = t[:, :, num_prefix:].float()
        x1, x2 = patches.chunk(2, dim=-1)  # DINOv3 pairs the two HALVES of the head dim: (x1, x2) -> (-x2, x1)
        return torch.cat((t[:, :, :num_prefix].float(), patches * cos + torch.cat((-x2, x1), -1) * sin), dim=2)

    return rotate


class LayerScale(nn.Module):
    def __init__(self, width, init):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), float(init)))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width, heads, mlp_ratio, ffn, ln_eps, ls_init):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=ln_eps)
        self.attn = Attention(width, heads)
        self.ls1 = LayerScale(width, ls_init)
        self.norm2 = nn.LayerNorm(width, eps=ln_eps)
        hidden = int(width * mlp_ratio)
        # DINOv2 ViT-g's SwiGLU keeps 2/3 of the MLP width, rounded up to a multiple of 8
        self.mlp = SwiGLU(width, (int(hidden * 2 / 3) + 7) // 8 * 8) if ffn == "swiglu" else Mlp(width, hidden)
        self.ls2 = LayerScale(width, ls_init)

    def forward(self, x, rotate=None):
        x = x + self.ls1(self.attn(self.norm1(x), rotate))
        return x + self.ls2(self.mlp(self.norm2(x)))


def conv_stem(width, patch_size):
    """The stand-in teacher's patchifier: log2(patch) stages of conv3x3-BN-ReLU-maxpool2, then a 1x1 conv to
    the width (a 'hybrid' ViT). Its convolutional prior lets a small ViT learn shapes in minutes on a CPU,
    where a plain patch embedding needs far more data and steps."""
    layers, c = [], 3
    for i in range(int(math.log2(patch_size))):
        out = min(width, 32 * 2 ** i)
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
        c = out
    return nn.Sequential(*layers, nn.Conv2d(c, width, 1))


class DinoViT(nn.Module):
    """DINOv2 (pos="abs": learned position embedding, interpolated off-grid) and DINOv3 (pos="rope": no
    position embedding, 2D RoPE on patch tokens) in one class, with Meta's parameter names.

    forward(x) -> final-LayerNorm tokens [CLS, registers, patches]; `patch_tokens` drops the first
    1 + num_registers. pos_interp picks how DINOv2 resizes its position grid off its native size, which
    differs between the codes the weights were exported for: "meta" (bicubic, scale_factor with a 0.1
    offset), "hf" (transformers' Dinov2Model: bicubic to size=) or "hf_antialias"
    (Dinov2WithRegistersModel: the same with antialias, a different bicubic kernel)."""

    def __init__(self, img_size=224, patch_size=16, width=384, depth=12, heads=6, mlp_ratio=4.0,
                 ffn="mlp", num_registers=0, pos="abs", rope_theta=100.0, ln_eps=1e-6, ls_init=1e-5,
                 pos_interp="meta", stem="patch"):
        super().__init__()
        self.patch_size, self.num_registers, self.pos = patch_size, num_registers, pos
        self.heads, self.rope_theta, self.pos_interp = heads, rope_theta, pos_interp
        self.patch_embed = (nn.Conv2d(3, width, patch_size, patch_size) if stem == "patch"
                            else conv_stem(width, patch_size))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        if num_registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, width))
        if pos == "abs":
            n = (img_size // patch_size) ** 2
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n, width))
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, ffn, ln_eps, ls_init) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=ln_eps)
        init_weights(self)
        for p in (self.cls_token, getattr(self, "register_tokens", None), getattr(self, "pos_embed", None)):
            if p is not None:
                nn.init.normal_(p, std=0.02)

    def interpolate_pos_embed(self, gh, gw):
        pos = self.pos_embed
        n = pos.shape[1] - 1
        m = int(math.sqrt(n))
        if gh * gw == n and gh == gw:
            return pos
        # 1 x (m m) x D -> 1 x m x m x D -> 1 x D x m x m
        grid = pos[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
        if self.pos_interp == "meta":
            kw = {"scale_factor": ((gh + 0.1) / m, (gw + 0.1) / m), "antialias": False}
        else:  # transformers: Dinov2Model without antialias, Dinov2WithRegistersModel with it
            kw = {"size": (gh, gw), "antialias": self.pos_interp == "hf_antialias"}
        grid = F.interpolate(grid, mode="bicubic", align_corners=False, **kw)
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1).to(pos.dtype)  # 1 x D x gh x gw -> 1 x (gh gw) x D
        return torch.cat((pos[:, :1], grid), dim=1)

    def forward(self, x, rope_rescale=None):
        B, _, H, W = x.shape
        gh, gw = H // self.patch_size, W // self.patch_size
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # B x D x gh x gw -> B x (gh gw) x D
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        rotate = None
        if self.pos == "abs":
            x = x + self.interpolate_pos_embed(gh, gw)
        else:
            head_dim = x.shape[-1] // self.heads
            rope = dinov3_rope(gh, gw, head_dim, self.rope_theta, rope_rescale, x.device)
            rotate = dinov3_rotate(rope, 1 + self.num_registers)
        if self.num_registers:
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]), dim=1)
        for block in self.blocks:
            x = block(x, rotate)
        return self.norm(x)

    def patch_tokens(self, x, rope_rescale=None):
        return self(x, rope_rescale)[:, 1 + self.num_registers:]


def _dino(family, width, depth, heads, registers=0, ffn="mlp"):
    if family == "dinov2":
        return dict(img_size=518, patch_size=14, width=width, depth=depth, heads=heads, ffn=ffn,
                    num_registers=registers, pos="abs", ln_eps=1e-6)
    return dict(img_size=224, patch_size=16, width=width, depth=depth, heads=heads, ffn=ffn,
                num_registers=4, pos="rope", rope_theta=100.0, ln_eps=1e-5)


# The official architectures (Meta's hub names). DINOv2 ViT-g uses a SwiGLU feed-forward.
ARCHS = {}
for _size, (_w, _d, _h) in {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}.items():
    ARCHS[f"dinov2_vit{_size}14"] = _dino("dinov2", _w, _d, _h)
    ARCHS[f"dinov2_vit{_size}14_reg"] = _dino("dinov2", _w, _d, _h, registers=4)
    ARCHS[f"dinov3_vit{_size}16"] = _dino("dinov3", _w, _d, _h)
ARCHS["dinov2_vitg14"] = _dino("dinov2", 1536, 40, 24, ffn="swiglu")
ARCHS["dinov2_vitg14_reg"] = _dino("dinov2", 1536, 40, 24, registers=4, ffn="swiglu")


# Where the official weights come from. DINOv2's are public; DINOv3's are licence-gated.
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{base}/{base}{reg}_pretrain.pth"
DINOV3_HELP = ("DINOv3 weights are licence-gated: accept the licence at "
               "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/ (Meta .pth) or "
               "https://huggingface.co/facebook/dinov3-vitl16-pretrain-lvd1689m (model.safetensors), "
               "download the file and pass its path with --teacher-weights")


def default_weights_url(arch):
    if arch.startswith("dinov2"):
        base = arch.removesuffix("_reg")
        return DINOV2_URL.format(base=base, reg="_reg4" if arch.endswith("_reg") else "")
    return None


#################################################################################
#           Official checkpoint layouts -> our (Meta) parameter names           #
#################################################################################


# Tensors that the checkpoints carry but inference does not use: the masked-image-modelling token,
# DINOv3's RoPE periods (recomputed, and checked) and k-bias mask (applied, then dropped).
_UNUSED = ("mask_token",)


def _layout(sd):
    if "embeddings.patch_embeddings.projection.weight" in sd:
        return "hf_dinov2"
    if "embeddings.patch_embeddings.weight" in sd:
        return "hf_dinov3"
    if "storage_tokens" in sd or "rope_embed.periods" in sd:
        return "meta_dinov3"
    if "patch_embed.proj.weight" in sd:
        return "meta_dinov2"
    if "patch_embed.weight" in sd:
        return "ours"
    raise ValueError("unrecognised teacher checkpoint: none of the DINOv2/DINOv3 patch-embedding keys "
                     "(Meta's 'patch_embed.proj.weight', Hugging Face's 'embeddings.patch_embeddings.*') "
                     "is present")


def _from_meta(sd, model):
    out = {}
    for k, v in sd.items():
        if k in _UNUSED or k.endswith("bias_mask"):
            continue
        if k == "rope_embed.periods":
            _check_rope_periods(v, model)
            continue
        if k.endswith("attn.qkv.bias") and k.replace(".bias", ".bias_mask") in sd:
            v = v * sd[k.replace(".bias", ".bias_mask")]  # DINOv3 has no k bias: the mask zeroes it
        k = k.replace("storage_tokens", "register_tokens").replace("patch_embed.proj.", "patch_embed.")
        out[k] = v
    return out


def _check_rope_periods(periods, model):
    head_dim = model.cls_token.shape[-1] // model.heads
    ours = model.rope_theta ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))
    if periods.shape != ours.shape or not torch.allclose(periods.float(), ours, rtol=1e-5):
        raise ValueError(f"checkpoint RoPE periods {periods.tolist()[:4]}... do not match theta "
                         f"{model.rope_theta} and head dim {head_dim}: wrong architecture for this file")


_HF_BLOCK = {  # transformers block names -> ours, for DINOv3 (first) and DINOv2 (second)
    "attention.o_proj.": "attn.proj.", "attention.output.dense.": "attn.proj.",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.up_proj.": "mlp.fc1.", "mlp.down_proj.": "mlp.fc2.",
    "mlp.weights_in.": "mlp.w12.", "mlp.weights_out.": "mlp.w3.",
}
_HF_QKV = {"attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2,
           "attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2}
_HF_TOP = {"embeddings.cls_token": "cls_token", "embeddings.register_tokens": "register_tokens",
           "embeddings.position_embeddings": "pos_embed", "layernorm.weight": "norm.weight",
           "layernorm.bias": "norm.bias"}


def _from_hf(sd):
    out, qkv = {}, {}
    for k, v in sd.items():
        k = k.removeprefix("encoder.")
        if k == "embeddings.mask_token":
            continue
        if not k.startswith("layer."):
            k = _HF_TOP.get(k, k).replace("embeddings.patch_embeddings.projection.", "patch_embed.")
            out[k.replace("embeddings.patch_embeddings.", "patch_embed.")] = v
            continue
        i, rest = k[len("layer."):].split(".", 1)
        module, kind = rest.rsplit(".", 1)
        if module in _HF_QKV:  # separate q, k, v Linears -> one fused qkv
            qkv.setdefault((i, kind), {})[_HF_QKV[module]] = v
            continue
        for a, b in _HF_BLOCK.items():
            rest = rest.replace(a, b)
        out[f"blocks.{i}.{rest}"] = v
    for (i, kind), parts in qkv.items():
        if kind == "bias" and 1 not in parts:  # DINOv3 has no k bias: it is zero
            parts[1] = torch.zeros_like(parts[0])
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[j] for j in range(3)], dim=0)
    return out


def convert_teacher_state(sd, model):
    """Map any official layout (Meta or Hugging Face, DINOv2 or DINOv3) to our names."""
    layout = _layout(sd)
    if layout.startswith("meta"):
        return _from_meta(sd, model)
    if layout.startswith("hf"):
        return _from_hf(sd)
    return dict(sd)


#################################################################################
#                    The Teacher: preprocessing + frozen ViT                    #
#################################################################################


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dino_preprocess(x, size, mean=torch.tensor(IMAGENET_MEAN), std=torch.tensor(IMAGENET_STD), processor_size=224):
    """The released preprocessing (`utils/foundation_models.py`): x in [-1, 1] -> uint8 by TRUNCATION ->
    *1/255 -> bilinear antialiased resize to 224 (the DINOv3 image processor's size) -> ImageNet
    normalisation -> bilinear resize (no antialias) to `size`, the teacher input that yields the tokenizer's
    grid. The Teacher passes `mean` and `std` from its own buffers, already on the device: copying them
    there at each step would wait for the GPU."""
    x = ((x.float() + 1) * 0.5 * 255).to(torch.uint8).float() * (1 / 255)
    x = F.interpolate(x, size=(processor_size, processor_size), mode="bilinear", align_corners=False,
                      antialias=True)
    x = (x - mean.to(x.device).view(1, 3, 1, 1)) / std.to(x.device).view(1, 3, 1, 1)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


class Teacher(nn.Module):
    """Frozen teacher: images in [-1, 1] at the tokenizer's size -> (B, grid*grid, D) float32 targets.

    `rope_jitter`: DINOv3's training-time RoPE coordinate rescale, exp(U(-ln 2, ln 2)) per batch; the
    released stage 1 left the teacher in training mode, so it is on by default there.
    Stand-in teachers see the images as they are (resized only if their grid needs it), and their tokens
    are standardised per channel with statistics stored in their checkpoint: a small classifier's
    final-norm tokens share one large common direction, which the cosine loss would otherwise learn
    without reading the latent (DINO features do not have that problem)."""

    def __init__(self, vit, kind, grid, rope_jitter=False, standardize=None):
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)
        self.kind, self.grid, self.rope_jitter = kind, grid, rope_jitter
        self.dim = vit.norm.weight.shape[0]
        mean, std = standardize if standardize is not None else (torch.zeros(self.dim), torch.ones(self.dim))
        self.register_buffer("target_mean", mean.float(), persistent=False)
        self.register_buffer("target_std", std.float(), persistent=False)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD), persistent=False)

    def train(self, mode=True):
        # Frozen: a parent's .train() never reaches the ViT (the jitter is the one train-mode effect kept).
        super().train(mode)
        self.vit.eval()
        return self

    def preprocess(self, x):
        size = self.grid * self.vit.patch_size
        if self.kind == "standin":
            return x.float() if x.shape[-1] == size else F.interpolate(
                x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return dino_preprocess(x, size, self.pixel_mean, self.pixel_std)

    @torch.no_grad()
    def forward(self, x, rope_rescale=None):
        if rope_rescale is None and self.rope_jitter and self.training and self.vit.pos == "rope":
            rope_rescale = torch.empty(1).uniform_(-math.log(2), math.log(2)).exp()
        return (self.vit.patch_tokens(self.preprocess(x), rope_rescale).float() - self.target_mean) / self.target_std


def build_teacher(name, weights=None, grid=16, rope_jitter=True, prefix=""):
    """'dinov3_vitl16' etc. with official weights, or 'standin' with a checkpoint from this file (path or
    URL), which also records the data it trained on (`.data`)."""
    if name == "standin":
        if not weights or not (is_url(weights) or os.path.isfile(weights)):
            raise FileNotFoundError(f"stand-in teacher checkpoint not found: {weights}. Train one with "
                                    f"`python distill.py` (or --data DIR), or pick an official teacher")
        ckpt = load_checkpoint(weights, ("teacher",), "stand-in teacher checkpoint (distill.py's teacher.pt)")
        if "target_mean" not in ckpt:
            raise ValueError(f"{weights} is a stand-in teacher's run checkpoint, not its final teacher.pt: "
                             f"let `python distill.py` finish, then pass OUT/teacher.pt")
        vit = DinoViT(**ckpt["config"]["vit"])
        sd = {k[len("vit."):]: v for k, v in ckpt["ema"].items() if k.startswith("vit.")}
        load_strict(vit, sd, f"stand-in teacher {weights}")
        teacher = Teacher(vit, "standin", grid, standardize=(ckpt["target_mean"], ckpt["target_std"]))
        teacher.data = ckpt.get("args", {}).get("data")
        return teacher
    if name not in ARCHS:
        raise ValueError(f"unknown teacher {name!r}; choose 'standin' or one of {sorted(ARCHS)}")
    cfg = dict(ARCHS[name])
    path = resolve_weights(weights, name)
    sd = read_state_dict(path, prefix)
    if cfg["pos"] == "abs" and _layout(sd) == "hf_dinov2":
        # keep the position-grid interpolation of the code the weights were exported for
        cfg["pos_interp"] = "hf_antialias" if cfg["num_registers"] else "hf"
    vit = DinoViT(**cfg)
    load_strict(vit, convert_teacher_state(sd, vit), f"{path} ({_layout(sd)} layout)")
    return Teacher(vit, "dino", grid, rope_jitter=rope_jitter)


#################################################################################
# The stand-in teacher: a small ViT trained as a classifier on the data at hand #
#################################################################################


class StandinClassifier(nn.Module):
    """A DINOv3-style ViT (RoPE, registers, convolutional stem) plus a linear head on the max over patch
    tokens, so that the patch tokens themselves carry the class: those tokens are the distillation targets.
    (Max- rather than mean-pooling: the object covers a fraction of the image, and the mean over tokens
    washes it out; the mean-pooled variant barely leaves chance level in the tiny preset's budget.)"""

    def __init__(self, vit, num_classes):
        super().__init__()
        self.vit = DinoViT(**vit)
        self.head = nn.Linear(vit["width"], num_classes)

    def forward(self, x):
        return self.head(self.vit.patch_tokens(x).amax(dim=1))


def standin_vit(c):
    """The stand-in teacher's ViT from a preset or the flags (`c`: image_size, patch_size, width, depth, heads):
    DINOv3-style (RoPE, 4 registers, LayerScale) with the convolutional stem."""
    return dict(img_size=c["image_size"], patch_size=c["patch_size"], width=c["width"], depth=c["depth"],
                heads=c["heads"], num_registers=4, pos="rope", ls_init=1e-1, ln_eps=1e-6, stem="conv")


#################################################################################
#      Image data: class folders (ADM center crop) and the built-in shapes      #
#################################################################################


def center_crop_adm(image, size):
    """ADM's center crop (`center_crop_arr`): halve with a BOX filter while the short side is >= 2*size, resize the
    short side to `size` with BICUBIC, then crop the centre size x size."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def to_tensor(arr):
    """uint8 HWC -> float CHW in [-1, 1], the range every network here reads."""
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1).float() / 127.5 - 1.0  # a writable copy


def readable(path):
    """A quick header check (PIL reads the header only): a file that fails it would stop a run mid-epoch."""
    try:
        with Image.open(path) as im:
            return im.size[0] > 0 and im.size[1] > 0
    except Exception:
        return False


def unreadable(paths, every_rank=True):
    """The files of `paths` whose header does not read. When every rank lists the folder (`every_rank`), each
    checks a contiguous 1/world share and the lists are gathered: on shared storage the world reads each
    header once, not world times. Four threads, each a contiguous run of files, not a task per file: the
    check is Python-bound once the files are cached (README, "Faults and bad input")."""
    rank, world = world_info() if every_rank else (0, 1)
    mine = paths[rank * len(paths) // world:(rank + 1) * len(paths) // world]
    runs = [mine[i * len(mine) // 4:(i + 1) * len(mine) // 4] for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        bad = [path for run in pool.map(lambda run: [p for p in run if not readable(p)], runs) for path in run]
    return [path for share in gather_objects(bad, world) for path in share]


def class_folders(root):
    """root/<class>/... -> (class names, [(image path, label)], other files). Classes are the sorted
    sub-folders; a class's images are read at any depth (fid.list_images, the one rule for what an image
    is). A class with no image is refused: it would be a label that no image has."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders: expected root/<class>/<image files>, as ImageNet's "
                         f"train and val folders")
    samples, others, empty = [], [e.path for e in os.scandir(root) if not e.is_dir()], []
    for label, name in enumerate(classes):
        images, rest = fid.list_images(os.path.join(root, name))
        samples += [(path, label) for path in images]
        others += rest
        if not images:
            empty.append(name)
    if empty:
        raise ValueError(f"{root}: {len(empty)} of {len(classes)} class folders hold no images "
                         f"({', '.join(fid.IMAGE_EXTENSIONS)}), e.g. {', '.join(empty[:3])}: remove them or add "
                         f"their images{fid.not_images(others)}")
    return classes, samples, others


class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/<images, at any depth>, classes sorted by name (ImageNet's train/val layout); with
    `classes=False` every image under root, label 0 (a folder to reconstruct). Returns (image, label); the
    random flip is applied in the training loop, from a checkpointed generator. Files whose header does not
    read are reported when the folder is listed, or left out (and counted) with skip_bad; with skip_bad a
    file that fails later (a truncated body) is skipped when read, its index logged, and `collate` drops
    it from its batch. Under torchrun every rank builds it, and they share the check (`every_rank=False`
    for a set one rank builds alone)."""

    def __init__(self, root, size, skip_bad=False, every_rank=True, classes=True):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data folder not found: {root} (expected root/<class>/<image files>)")
        self.root, self.size, self.skip_bad = root, size, skip_bad
        if classes:
            self.classes, self.samples, others = class_folders(root)
        else:
            images, others = fid.list_images(root)
            self.classes, self.samples = [""], [(path, 0) for path in images]
        if not self.samples:
            raise ValueError(f"{root} has no images ({', '.join(fid.IMAGE_EXTENSIONS)}){fid.not_images(others)}")
        bad = unreadable([path for path, _ in self.samples], every_rank)
        if bad and not skip_bad:
            raise ValueError(f"{len(bad)} of {len(self.samples)} files in {root} are not readable images (e.g. "
                             f"{', '.join(bad[:3])}): remove or replace them, or pass --skip-bad-images")
        if bad:
            left_out = set(bad)
            self.samples = [s for s in self.samples if s[0] not in left_out]
        self.num_classes = len(self.classes)
        unread = f"; left out {len(bad)} unreadable files (--skip-bad-images)" if bad else ""
        counted = f" in {self.num_classes} classes" if classes else ""
        log(f"{root}: {len(self.samples)} images{counted}{fid.not_images(others)}{unread}")

    def __len__(self):
        return len(self.samples)

    def name(self, i):
        """Image i's path relative to the root: how caches and reconstructions name it."""
        return os.path.relpath(self.samples[i][0], self.root)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            return to_tensor(center_crop_adm(fid.load_rgb(path), self.size)), label
        except Exception as e:
            if not self.skip_bad:
                raise RuntimeError(f"cannot read image {path}: {e}. Remove or replace the file, or pass "
                                   f"--skip-bad-images to skip it") from None
            print(f"skipped image {i} ({path}), which does not decode: {e} (--skip-bad-images)", file=sys.stderr)
            return None


def collate(items):
    """A batch of the items that read: ImageFolder gives None for a file skipped when read."""
    kept = [item for item in items if item is not None]
    if not kept:
        raise RuntimeError(f"none of the {len(items)} images of a batch decodes (their indices are logged above): "
                           f"the data folder is damaged; check it, or use a larger --batch-size")
    return torch.utils.data.default_collate(kept)


class Numbered(torch.utils.data.Dataset):
    """Items `indices` of a data set, each with its position in `indices` (what a cache writes by); None for
    an item that is None (a file skipped when read)."""

    def __init__(self, data, indices):
        self.data, self.indices = data, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        item = self.data[self.indices[k]]
        return None if item is None else (*item, k)


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
    """The built-in data set: a shape of one of 10 classes with random position, size, rotation
    and colour on a textured background. Image i is a pure function of (seed, split, i), at any size.
    Rendered images are kept (per process) when the set fits in `cache_bytes`: a render costs about as
    much as a tiny model's step on it."""

    num_classes = len(SHAPES)

    def __init__(self, num_images, size, split="train", seed=0, cache_bytes=2**28):
        self.n, self.size, self.seed = num_images, size, seed
        self.split = {"train": 0, "val": 1}[split]
        self.cache, self.keep = {}, num_images * size * size * 3 <= cache_bytes

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
        # 2s x 2s x 3 -> s x 2 x s x 2 x 3, each 2 x 2 averaged
        image = image.reshape(self.size, 2, self.size, 2, 3).mean(axis=(1, 3))
        return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), label

    def __getitem__(self, i):
        arr, label = self.cache[i] if i in self.cache else self.render(i)
        if self.keep:
            self.cache[i] = arr, label
        return to_tensor(arr), label


def labels_of(data):
    """Every label of a data set without reading its images."""
    if isinstance(data, torch.utils.data.Subset):
        labels = labels_of(data.dataset)
        return [labels[i] for i in data.indices]
    if isinstance(data, ImageFolder):
        return [label for _, label in data.samples]
    return [i % data.num_classes for i in range(len(data))]


def image_files(data):
    """The files behind a folder data set, by index: (absolute paths, their paths relative to the root,
    class names); None for the built-in data. A Subset keeps its indices' files."""
    if isinstance(data, torch.utils.data.Subset):
        files = image_files(data.dataset)
        return files and tuple([column[i] for i in data.indices] for column in files)
    if not isinstance(data, ImageFolder):
        return None
    return ([path for path, _ in data.samples], [data.name(i) for i in range(len(data))],
            [data.classes[label] for _, label in data.samples])


def files_fingerprint(paths, names):
    """A hash of each file's relative path, size and modification time: a folder whose images were replaced
    (same names, same count) changes it, at the cost of one stat per file (eight threads; 1.28M files stat in
    seconds to a minute on shared storage, less than their headers take to check)."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        stats = list(pool.map(os.stat, paths, chunksize=1024))
    h = hashlib.sha1()
    for name, st in zip(names, stats):
        h.update(f"{name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def one_per_class(data, num=10):
    """Indices of the first image of each class (up to `num` classes): grids that show every class."""
    first = {}
    for i, label in enumerate(labels_of(data)):
        first.setdefault(label, i)
    return sorted(first.values())[:num]


def build_dataset(data, size, split="train", num_images=None, seed=0, skip_bad=False, every_rank=True):
    """'synthetic' -> the built-in data set (num_images of them, default 10,000 train / 1,000 val);
    anything else is a class-folder root (num_images, if set, keeps an evenly spaced subset)."""
    if data == "synthetic":
        return SyntheticShapes(num_images or (10000 if split == "train" else 1000), size, split, seed)
    return evenly_spaced(ImageFolder(data, size, skip_bad, every_rank), num_images)


def evenly_spaced(dataset, num_images, indices=None):
    """`num_images` evenly spaced items of `indices` (default all) of a data set; all of them without a count."""
    indices = range(len(dataset)) if indices is None else indices
    if num_images and num_images < len(indices):
        indices = [indices[i] for i in np.linspace(0, len(indices) - 1, num_images).round().astype(int)]
    if len(indices) == len(dataset):
        return dataset
    subset = torch.utils.data.Subset(dataset, list(indices))
    subset.num_classes = dataset.num_classes
    return subset


def train_val(data, size, val_data=None, num_train=None, num_val=None, seed=0, skip_bad=False):
    """A training set and a held-out set that never share an image: the built-in data's own splits, or
    --val-data's folder, or else every 50th image of the folder held out (the rule of every stage)."""
    if data == "synthetic" or val_data:
        return (build_dataset(data, size, "train", num_train, seed, skip_bad),
                build_dataset(val_data or data, size, "val", num_val, seed, skip_bad))
    full = ImageFolder(data, size, skip_bad)
    held = np.arange(len(full)) % 50 == 0
    log(f"held out every 50th image of {data} ({held.sum()} images) for validation; --val-data names a "
        f"separate folder")
    return (evenly_spaced(full, num_train, np.flatnonzero(~held).tolist()),
            evenly_spaced(full, num_val, np.flatnonzero(held).tolist()))


#################################################################################
#   Run plumbing: processes, files, checkpoints, the run loop, command lines.   #
#################################################################################
# A port of the method replaces everything from here on with its own framework's.


# ----- processes, devices, logging -----


_SETUPS = [0]  # nesting depth: a stage that runs another (tokenizer.py -> distill.py) shares its group
#: how long a collective may wait before the job is ended (NCCL's watchdog, gloo's own timeout): long enough
#: for a checkpoint of 13 GB to be written while the other ranks wait at the barrier after it. Long
#: one-sided work (ranks sampling unequal shares, rank 0 packing 50,000 PNGs) waits in wait_for_all.
TIMEOUT = datetime.timedelta(minutes=30)
_LONG_WAIT = []  # the process group of wait_for_all, made at its first use


def setup_distributed():
    """Rank, world size and device from the torchrun environment; plain `python FILE.py` is rank 0 of 1.
    NCCL on CUDA, gloo on CPU."""
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT)
    _SETUPS[0] += 1
    rank, world = world_info()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


def cleanup_distributed():
    """The outermost stage tears the process group down; a nested one only synchronises."""
    _SETUPS[0] = max(0, _SETUPS[0] - 1)
    if is_distributed():
        dist.barrier()
        if _SETUPS[0] == 0:
            dist.destroy_process_group()
            _LONG_WAIT.clear()


def is_distributed():
    """The one test of "is this run on several processes?" (torchrun started it and the group is up)."""
    return dist.is_available() and dist.is_initialized()


def world_info():
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def barrier():
    if is_distributed():
        dist.barrier()


def wait_for_all():
    """A barrier after long one-sided work, on a CPU (gloo) process group with a day's timeout: no
    watchdog ends a job whose ranks wait there for tens of minutes (the first call, on every rank, makes
    the group)."""
    if is_distributed():
        if not _LONG_WAIT:
            _LONG_WAIT.append(dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1)))
        dist.barrier(group=_LONG_WAIT[0])


def log(*args):
    """Print on rank 0 only, flushed (one line per logging interval)."""
    if not is_distributed() or dist.get_rank() == 0:
        print(*args, flush=True)


def enable_tf32(device):
    """The trainers' fp32 matmuls and convolutions in TF32 on CUDA, as the authors run them (what autocast
    leaves in fp32: the ConvNeXt-S perceptual term, the losses). fid.py's Inception keeps full fp32."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"


def compile_blocks(model, *types):
    """--compile: each block of `types` in `model` through torch.compile (inductor builds its kernels at the
    first steps, a minute or so). Blocks only: they hold nearly all the arithmetic and draw no random
    number, so a compiled step draws what an eager one does. A sequence length that changes (MAE masking
    keeps another number of tokens each batch) recompiles once with the length symbolic, then reuses it."""
    for m in model.modules():
        if isinstance(m, types):
            m.compile()


#: True runs the CUDA path's bf16 autocast on the CPU as well (the tests do, so that the mixed-precision path
#: runs without a GPU; off by default: bf16 is slow on most CPUs)
BF16_ON_CPU = False


def autocast(device):
    """The one mixed-precision rule: bf16 autocast on CUDA, full precision on the CPU (see BF16_ON_CPU)."""
    return torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda" or BF16_ON_CPU)


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def gather_objects(obj, world):
    """Every rank's object on every rank (RNG states differ per rank and all are checkpointed)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def gather(blocks):
    """Every rank's row blocks (a list of CPU tensors), concatenated in rank order: shards may be uneven,
    and a rank with no share (more processes than images) passes an empty list."""
    return torch.cat([b for share in gather_objects(list(blocks), world_info()[1]) for b in share])


def broadcast_module(module):
    """Rank 0's parameters and buffers on every rank. For a module that is not wrapped in DDP (which does
    this at construction): without it each rank would keep the module its own seed built, and train it."""
    if is_distributed():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, 0)


def allreduce_grads(module):
    """Average gradients over ranks by hand, for a module that is not wrapped in DDP (the discriminator,
    whose two forward calls per step DDP would not accept)."""
    if is_distributed():
        world = dist.get_world_size()
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(world)


def diverged(latest):
    """What a diverged run can do: which checkpoint it keeps, and why resuming that one would not help."""
    kept = (f"{latest} (step {load_checkpoint(latest, ('teacher', 'tokenizer', 'generator'), 'checkpoint')['step']}) "
            f"is kept, but resumed with the same settings it takes the same steps and diverges again"
            if latest and os.path.isfile(latest) else "the run wrote no checkpoint")
    return (f"stopping before anything non-finite is saved: {kept}. Start a fresh run (another --out) with a lower "
            f"learning rate or a longer warm-up")


def any_rank(*flags):
    """Each boolean flag (a tensor on this rank's device), true where it is true on any rank: one
    all-reduce and one read for all of them, so that every rank stops together."""
    stacked = torch.stack(flags).double()
    if is_distributed():
        dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
    return [bool(v) for v in stacked.tolist()]


@torch.no_grad()
def check_weights(modules, step, latest=None):
    """Before each checkpoint: every weight is finite, and every rank holds rank 0's, or the run stops (all
    ranks together, none left waiting). A finite loss does not prove finite weights: a nan or inf gradient
    (an overflow in the backward pass) leaves it finite. One float64 sum per tensor: any nan or inf
    makes it non-finite; equal tensors give equal sums, and any difference changes them. BatchNorm running
    statistics are per rank and unused (train-mode BN reads batch statistics), so only parameters count."""
    for name, module in modules.items():
        sums = torch.stack([p.detach().double().sum() for p in module.parameters()])
        ref = sums.clone()
        if is_distributed():
            dist.broadcast(ref, 0)
        nonfinite, differs = any_rank((~torch.isfinite(sums)).any(), (sums != ref).any())
        if nonfinite:
            raise FloatingPointError(f"the {name} weights became nan or inf at or before step {step}; "
                                     f"{diverged(latest)}")
        if differs:
            raise RuntimeError(f"the ranks hold different {name} weights: every rank must build the same "
                               f"{name} (broadcast rank 0's) and average its gradients")


# ----- files: atomic writes (checkpoints, JSON, PNG), run folders -----


#: the pipeline's default run folders: each stage reads the previous one's default output
RUNS = {"teacher": "runs/teacher", "tokenizer": "runs/tokenizer", "tokenizer_ft": "runs/tokenizer_ft",
        "latents": "runs/latents", "dit": "runs/dit", "samples": "runs/samples", "probe": "runs/probe",
        "fid_stats": "runs/fid_stats", "reconstruct": "runs/reconstruct"}
#: the stand-in teacher that `python distill.py` writes and the tiny presets read
STANDIN_TEACHER = os.path.join(RUNS["teacher"], "teacher.pt")


def atomic_write(path, write):
    """write(f) into a temporary binary file beside `path`, then os.replace: a crash never leaves a
    half-written checkpoint, cache file or image behind (every stage writes its files through this). A
    failed write removes its temporary; a full disk says so."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
    except BaseException as e:
        full = disk_full(e, path)  # before the temporary goes: it holds the space that is missing
        if os.path.exists(tmp):
            os.remove(tmp)
        if full:
            raise no_space(path) from None
        raise
    os.replace(tmp, path)


def disk_full(error, path):
    """Whether a failed write ran out of space: ENOSPC, or (torch.save says only "unexpected pos" or "file
    write failed") less than a MiB left on the device holding `path`."""
    if getattr(error, "errno", None) == errno.ENOSPC:
        return True
    folder = os.path.dirname(os.path.abspath(path))
    return isinstance(error, (OSError, RuntimeError)) and shutil.disk_usage(folder).free < 2**20


def no_space(path):
    return OSError(errno.ENOSPC, f"no space left on the device holding {path}: free some space (or pick another "
                                 f"--out) and run again; the files written before are untouched")


STALE_TEMPORARY = re.compile(r".+\.tmp\d+")
LOCK = ".lock"
_HELD = []  # the folders whose lock this process holds


def process_start(pid):
    """When process `pid` started (clock ticks since boot, from /proc), None if there is no such process:
    with the pid it tells the run that wrote a lock from a later process that got its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, counted from the state (field 3)
    except (OSError, ValueError, IndexError):
        return None


def lock_owner():
    """This process as a lock names it."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid())}


def alive_here(holder):
    """Whether a lock's holder runs on this host: its pid exists and started when the lock says."""
    return (holder.get("host") == socket.gethostname() and holder.get("start") is not None
            and process_start(holder.get("pid")) == holder["start"])


def hold_out_dir(folder):
    """One run per folder: OUT/.lock names its holder (host, pid, start time). A second run there is refused
    with the holder's name: two runs in one folder overwrite each other's checkpoints, and each takes the
    other's live temporary file for one a crash left. A lock whose process is gone (on this host) is taken
    over, with a line that says so. Released when the stage's main() returns or raises (`stage`), or at
    exit."""
    path, me = os.path.join(folder, LOCK), lock_owner()
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = read_lock(path)
            if holder != me and alive_here(holder):
                raise RuntimeError(f"{folder} is in use by another run (process {holder['pid']} on this host, "
                                   f"its {LOCK}): wait for it to finish, stop it, or pick another --out") from None
            if holder.get("host", me["host"]) != me["host"]:
                raise RuntimeError(f"{folder} is in use by a run on host {holder['host']} (process "
                                   f"{holder['pid']}, its {LOCK}): pick another --out, or, if that run is gone, "
                                   f"delete {path}") from None
            if holder != me:
                log(f"{folder}: taking over the lock of process {holder.get('pid')}, which is gone")
            os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    _HELD.append(folder)


def read_lock(path):
    """A lock's holder; {} for a lock being written this instant or left empty by a crash."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        time.sleep(0.5)  # its writer may be between creating it and writing it
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}


def release_out_dirs(keep=0):
    """Remove the locks this process holds but the first `keep` (a stage's end: those it took; at exit:
    all)."""
    me = lock_owner()
    while len(_HELD) > keep:
        path = os.path.join(_HELD.pop(), LOCK)
        if os.path.exists(path) and read_lock(path) == me:
            os.remove(path)


atexit.register(release_out_dirs)


def stage(main):
    """The decorator of every stage's main(): however it ends, the folders it locked are released and the
    signal handlers it set (Preemption) restored, so that a stage that failed inside a notebook or a test
    leaves no lock for another process to trip on."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        keep, handlers = len(_HELD), {s: signal.getsignal(s) for s in Preemption.SIGNALS}
        try:
            return main(*args, **kwargs)
        finally:
            release_out_dirs(keep)
            for s, handler in handlers.items():
                signal.signal(s, handler)
    return run


def prepare_out_dir(folder):
    """Before a run spends any time (rank 0): the output folder exists and takes a write, so a read-only
    or full disk fails now, not after training; the run holds the folder (hold_out_dir); temporaries that a
    killed write left are removed (never a live run's: a live run holds its folder)."""
    probe = os.path.join(folder, f".write_test{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(bytes(1 << 16))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(e.errno, f"cannot write to {folder} ({e.strerror}): pick a writable --out with free "
                               f"space") from None
    finally:
        if os.path.exists(probe):
            os.remove(probe)
    hold_out_dir(folder)
    stale = [f for f in os.listdir(folder) if STALE_TEMPORARY.fullmatch(f)]
    for name in stale:
        os.remove(os.path.join(folder, name))
    if stale:
        log(f"removed {len(stale)} temporary file(s) that an interrupted write left in {folder}")


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def save_grid(rows, path):
    """Rows of images in [0, 1] (each (N, 3, H, W)) -> one PNG."""
    grid = torch.cat([torch.cat(list(r.float().cpu()), dim=2) for r in rows], dim=1)
    # 3 x (rows H) x (N W) -> (rows H) x (N W) x 3
    save_png((grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), path)


def save_png(image, path):
    """A uint8 (H, W, 3) array -> a PNG, atomically: a PNG that exists is whole."""
    atomic_write(path, lambda f: Image.fromarray(image).save(f, format="PNG"))


# ----- random state, weights fingerprints, checkpoint loading -----


def rng_state():
    """Every random stream a training step consumes, so a resumed run continues bit for bit; as tensors,
    numbers and lists only, so that checkpoints load with weights_only=True."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, python, _ = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                       gauss], "python": [version, list(python)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((state["python"][0], tuple(state["python"][1]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def reseed(seed, generators=None):
    """Seed every random stream of this process (and `generators`) from one number."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    for gen in (generators or {}).values():
        gen.manual_seed(seed)


def indexed_noise(shape, *key):
    """N(0, 1) noise that is a function of `key` alone (seed, image index, ...): the same on any rank, in
    any batch (the sampler's initial noise, the probe's flow noise)."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0])
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def weights_fingerprint(tensors):
    """Identifies a set of weights exactly (a module's state dict, or any named tensors): sha1 over each
    tensor's name and bytes, the same on any device and thread count, so the latent cache written on a
    GPU recognises its tokenizer loaded on a CPU. About a second per GB of weights."""
    if isinstance(tensors, nn.Module):
        tensors = tensors.state_dict()
    h = hashlib.sha1()
    for name, t in tensors.items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def load_checkpoint(path, kinds, what):
    """A checkpoint file as plain data: torch.load with weights_only=True, so nothing in the file runs (a
    pickle can call any function; these files are downloaded and shared). Every error names the file and
    what was expected: missing, damaged (empty, truncated, not a torch file), holding objects other than
    tensors, numbers, strings, lists and dicts, or a `kind` other than `kinds` (our checkpoints record one;
    the authors' files have none and are told apart by their keys). The file is memory-mapped: a tensor
    is read from disk when it is used, so eight ranks that load a 13 GB generator checkpoint to take its
    EMA do not each hold all of it in host memory (files in PyTorch's pre-1.6 format are read whole)."""
    if is_url(path):
        path = fetch(path, f"or download the {what} yourself and pass its path")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1][:200]
        raise ValueError(f"{path}: refused: it holds objects other than tensors, numbers, strings, lists and "
                         f"dicts, which could run code when loaded ({reason}). Expected a {what}; re-save "
                         f"the weights alone (a state dict) from a copy you trust") from None
    except Exception as e:
        raise ValueError(f"{path} is damaged or not a PyTorch checkpoint (empty, truncated or another "
                         f"format: {type(e).__name__}: {str(e)[:200]}); expected a {what}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict; expected a {what}")
    if ckpt.get("kind", kinds[0]) not in kinds:
        raise ValueError(f"{path} is a {ckpt['kind']} checkpoint; expected a {what}")
    return ckpt


def load_strict(model, sd, what):
    """load_state_dict with a message that lists every missing and unexpected key; weights that are nan or
    inf are refused (an evaluation of them reported "psnr nan" and exited 0)."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in sd]
    unexpected = [k for k in sd if k not in ours]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items()
             if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{what} does not fit the chosen architecture.\n  missing keys ({len(missing)}): "
                         f"{missing[:20]}\n  unexpected keys ({len(unexpected)}): {unexpected[:20]}\n"
                         f"  shape mismatches, file vs model ({len(wrong)}): {wrong[:10]}\n"
                         f"Pick the architecture that matches the file.")
    bad = [k for k, v in sd.items() if torch.is_floating_point(v) and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{what} holds nan or inf weights ({len(bad)} tensors, e.g. {bad[:3]}): it was saved by a "
                         f"run that diverged; use a checkpoint from before that")
    model.load_state_dict(sd)


# ----- the training loop's parts: EMA, data order, the run skeleton (save/resume), schedules, speed -----


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, over parameters (buffers are copied)."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def make_ema(model):
    """EMA starts as an exact, frozen copy of the model (DiT's convention)."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler whose epoch can be entered at any step: the order of epoch e is fixed by
    (seed, e), and `start` skips the batches a resumed run has already seen."""

    def __init__(self, dataset, batch_size, seed, num_replicas=None, rank=None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.batch_size = batch_size
        self.start = 0

    def set_position(self, epoch, step_in_epoch):
        self.set_epoch(epoch)
        self.start = step_in_epoch * self.batch_size

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self):
        return self.num_samples - self.start


def make_loader(dataset, batch_size, seed, rank, world, workers, device):
    """Per-rank loader: the resumable sampler, worker processes and pinned memory."""
    sampler = ResumableSampler(dataset, batch_size, seed, num_replicas=world, rank=rank)
    # The loader's own generator: creating an iterator then draws nothing from the global RNG, whose state
    # (mask noise, posterior and flow eps) a resumed run restores exactly.
    # Persistent workers keep what a data set caches (the built-in shapes render once, not every epoch), but
    # they hold the copy of the data set made when they started: one whose items follow set_epoch (the
    # latent cache's flip choice) gets fresh workers each epoch, or every epoch would read the first's.
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True, collate_fn=collate,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed),
        persistent_workers=workers > 0 and not hasattr(dataset, "set_epoch"))
    return loader, sampler


def shard(data, rank, world):
    """This rank's contiguous share of a data set for an evaluation pass: every item exactly once (a
    DistributedSampler pads with repeats), in index order once gathered, so results do not depend on the
    number of processes."""
    return torch.utils.data.Subset(data, range(rank * len(data) // world, (rank + 1) * len(data) // world))


def random_flip(x, generator):
    """Horizontal flip with p = 0.5 (the released training data), drawn from a checkpointed generator so
    that a resumed run flips the same images."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    if x.is_cuda:  # a copy from pageable memory would first wait for the GPU to finish the last step
        flip = flip.pin_memory()
    flip = flip.to(x.device, non_blocking=True)[:, None, None, None]
    return torch.where(flip, x.flip(-1), x)


def micro_batches(loader, accum):
    """Group the loader's batches into optimizer steps of `accum` micro-batches: a list of (inputs, labels)."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == accum:
            yield group
            group = []


def sync_at_last(ddp, last):
    """Gradient accumulation under DDP: no all-reduce on the micro-batches before the last (their gradients
    add up locally), one on the last, so a step costs one all-reduce whatever --grad-accum."""
    return ddp.no_sync() if not last and is_distributed() else contextlib.nullcontext()


class Preemption:
    """SIGTERM or SIGUSR1 (a cluster preempting the job, or warning that its time is nearly up) asks the run
    to stop. The handler only notes it; a trainer learns after each step whether any rank was asked (a
    one-byte all-reduce on a CPU process group: no GPU sync), and all ranks save that step together and
    exit. A second signal exits at once (SystemExit: a checkpoint being written is abandoned and its
    temporary removed, latest.pt untouched); SIGINT keeps Python's KeyboardInterrupt, which does the same.
    Under torchrun, TORCHELASTIC_SIGNALS_TO_HANDLE must name SIGUSR1 for the launcher to pass it on."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, agree=False):
        self.received = None
        self.group = dist.new_group(backend="gloo") if agree and is_distributed() else None
        for s in self.SIGNALS:  # the stage's own handlers are restored when it ends (`stage`)
            signal.signal(s, self.note)

    def note(self, signum, frame):
        if self.received:
            raise SystemExit(128 + signum)
        self.received = signal.Signals(signum).name

    def agreed(self):
        """The signal if any rank received one (the same answer on every rank), else None."""
        if self.group is None:
            return self.received
        flag = torch.tensor([self.received is not None], dtype=torch.uint8)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return (self.received or "a signal to another rank") if flag.item() else None

    def stopped(self, done):
        """encode and sample.py, after a batch: whether a signal asks to stop. Every finished batch is on
        disk, so running the same command again continues from it; each rank stops on its own."""
        if self.received:
            log(f"{self.received}: stopped with {done} written; run the same command to continue")
        return self.received is not None


#: flags that steer how a run goes, not what it trains: they may change between a stop and its resume (the
#: batch's split into --batch-size x --grad-accum too: the global batch is checked apart). Every other
#: setting, presets included, must be the saved run's.
RUN_CONTROL = ("out", "log_every", "ckpt_every", "save_every", "workers", "stop_at", "bench", "grid_every",
               "preview_every", "compile", "grad_checkpoint", "batch_size", "grad_accum", "random_weights",
               "tokenizer", "init", "teacher_weights", "vgg16_weights", "lpips_weights", "convnext_weights")


def changed_settings(saved, now):
    """The settings (flags outside RUN_CONTROL) whose values differ between a saved run's args and now's, as
    '--flag: SAVED there, NOW now'."""
    return [f"--{k.replace('_', '-')}: {saved[k]} there, {v} now" for k, v in now.items()
            if k in saved and k not in RUN_CONTROL and saved[k] != v]


class Run:
    """The run skeleton of the three trainers. A trainer builds its nets, hands Run what a checkpoint holds
    (`states`: key -> object with state_dict, e.g. model, EMA, optimizers; `generators`: key -> per-rank
    torch.Generator; `match`: what a resumed run must share, e.g. config, data) and writes its loop: one
    optimizer step, `run.tick`, `if run.log_due()`, `if run.checkpoint_due(): run.save()`. The constructor
    resumes OUT/latest.pt if there is one (`resume` reads what `save` writes). It stops at --stop-at, or
    after --bench N steps, which write nothing and report one line (`Bench`). Every step's loss is watched
    on the device (no host sync in the step) and checked, one sync, at each log line and before each
    checkpoint: a run that diverged stops before anything non-finite is saved."""

    def __init__(self, args, kind, device, num_images, global_batch, states, generators=None, match=None,
                 check=None, inputs_from=None):
        if num_images < global_batch:  # an epoch of no step: the run would end at once, having done nothing
            raise ValueError(f"the data set has {num_images} images, fewer than one global batch of {global_batch} "
                             f"(--batch-size x --grad-accum x processes): lower them or add data")
        self.args, self.kind, self.device = args, kind, device
        self.rank, self.world = world_info()
        self.steps_per_epoch = num_images // global_batch
        self.total = args.epochs * self.steps_per_epoch
        self.stop = min(self.total, args.bench or args.stop_at or self.total)
        self.states, self.generators = states, generators or {}
        self.match = dict(match or {}, global_batch=global_batch)
        self.check = check or {kind: states["model"]}  # checked at each checkpoint: finite, the same on all ranks
        self.latest = os.path.join(args.out, "latest.pt")
        self.inputs_from = inputs_from  # the file a trainer's watched inputs are read from (tick)
        self.meter, self.nonfinite = Throughput(device), torch.zeros((), dtype=torch.bool, device=device)
        self.bad_inputs = torch.zeros((), dtype=torch.bool, device=device)
        self.bench = Bench(device) if args.bench else None
        self.step = self.start = 0 if args.bench else self.resume()
        self.preemption, self.preempted = Preemption(agree=True), None

    @property
    def epoch(self):
        return self.step / self.steps_per_epoch

    def tick(self, images, loss, inputs=None):
        """After each optimizer step: `images` is the step's global batch, `loss` stays on the device;
        `inputs`, the step's training inputs where they are read from a file that could hold nan or inf (the
        latent cache, `inputs_from`), are watched too, so that a bad file is named rather than the learning
        rate."""
        self.step += 1
        self.nonfinite |= ~torch.isfinite(loss.detach())
        if inputs is not None:
            self.bad_inputs |= ~torch.isfinite(inputs).all()
        self.meter.add(images)
        if self.bench:
            self.bench.tick(images)
        elif self.step < self.stop:  # a signal: stop at this step (the trainer saves where it stops)
            self.preempted = self.preemption.agreed()
            self.stop = self.step if self.preempted else self.stop

    def every(self, n):
        """The one cadence rule (log lines, checkpoints, pictures): every n steps and where the run stops;
        n = 0: never."""
        return n > 0 and (self.step % n == 0 or self.step == self.stop)

    def check_finite(self):
        bad_inputs, nonfinite = any_rank(self.bad_inputs, self.nonfinite)
        if bad_inputs:
            raise FloatingPointError(f"the training inputs held nan or inf at or before step {self.step}, read from "
                                     f"{self.inputs_from}: the file is damaged, not the run")
        if nonfinite:
            raise FloatingPointError(f"the loss became nan or inf at or before step {self.step}; "
                                     f"{diverged(self.latest)}")

    def log_due(self):
        """A log line now? Then the losses are checked (one sync) and the caller may read them."""
        due = self.every(self.args.log_every)
        if due:
            self.check_finite()
        return due

    def epoch_end(self):
        return self.step % self.steps_per_epoch == 0

    def checkpoint_due(self):
        """latest.pt every --ckpt-every steps, at each epoch's end and where the run stops, whatever
        --ckpt-every (never in bench)."""
        return not self.bench and (self.every(self.args.ckpt_every) or self.epoch_end() or self.step == self.stop)

    def record(self, keys=None, **extra):
        """The run's weights (`keys` of `states`, default all), what it must match, where it is, its args."""
        return {"kind": self.kind, **{k: self.states[k].state_dict() for k in keys or self.states}, **self.match,
                "step": self.step, "epoch": self.epoch, "args": vars(self.args), **extra}

    def save(self, name="latest.pt", **extra):
        """Check, then write OUT/name atomically on rank 0 while the others wait: nothing non-finite and no
        disagreement between ranks is ever saved. Every rank calls it: the record holds all ranks' RNG states."""
        self.check_finite()
        check_weights(self.check, self.step, self.latest)
        rngs = {k: gather_objects(g.get_state(), self.world) for k, g in self.generators.items()}
        state = dict(self.record(**extra), rng=gather_objects(rng_state(), self.world), **rngs)
        if self.rank == 0:
            atomic_save(state, os.path.join(self.args.out, name))
        barrier()
        if self.preempted and name == "latest.pt":
            log(f"{self.preempted}: stopped at step {self.step} of {self.total} and saved {self.latest}; run the "
                f"same command to resume")

    def resume(self):
        """Restore what save() wrote to OUT/latest.pt, if it exists: weights, optimizers, this rank's random
        streams. Returns the step to continue from (0 for a new run). A checkpoint made with another `match`
        is refused rather than silently mixed. On another number of processes (same global batch) the run
        continues, but not bit for bit: each rank's random streams are re-seeded."""
        if not os.path.isfile(self.latest):
            return 0
        ckpt = load_checkpoint(self.latest, (self.kind,), f"{self.kind} run checkpoint to resume")
        changed = changed_settings(ckpt.get("args", {}), vars(self.args))
        if changed:
            raise ValueError(f"{self.latest} resumes only the run it saved, and this command changes what it trains "
                             f"({'; '.join(changed)}): resume with the saved settings, or start a fresh run in "
                             f"another --out")
        for key, value in self.match.items():
            if ckpt.get(key) != value:
                raise ValueError(f"{self.latest} was made with another {key.replace('_', ' ')} ({ckpt.get(key)}, "
                                 f"this run: {value}); resume it with the same flags and processes, or use a new --out")
        for key, obj in self.states.items():
            obj.load_state_dict(ckpt[key])
        if len(ckpt["rng"]) == self.world:
            set_rng_state(ckpt["rng"][self.rank])
            for key, gen in self.generators.items():
                gen.set_state(ckpt[key][self.rank])
        else:
            log(f"{self.latest} was written by {len(ckpt['rng'])} processes, this run has {self.world}: same global "
                f"batch, so it continues, with re-seeded random streams (not bit-identical to an uninterrupted run)")
            reseed(ckpt["step"] * self.world + self.rank, self.generators)
        done = ckpt["step"] >= self.stop  # a finished run started again, or a --stop-at already passed
        log(f"resumed from {self.latest} at step {ckpt['step']}" + (": the run stops there, no step to take" * done))
        return ckpt["step"]

    def done(self, name, forward=None, frozen=()):
        """The bench line (and its numbers) in bench mode, else None. `forward(n)`: the training loss on n
        samples of the last batch (for the activation memory); `frozen`: the nets outside `states` that the
        run holds (teacher, perceptual networks)."""
        if not self.bench:
            return None
        objs = [*self.states.values(), *frozen]
        modules = [m for m in objs if isinstance(m, nn.Module)]
        optimizers = [o for o in objs if isinstance(o, torch.optim.Optimizer)]
        return self.bench.report(name, (modules, optimizers, forward, self.args.batch_size))


#: the authors' rule (`utils/builders.py create_optimizer_and_scaler`): no decay for a name that contains
#: any of these, which covers position embeddings, mask and register tokens and every embedding layer
NO_DECAY_NAMES = ("ln", "bias", "norm", "gamma", "embed", "token")


def weight_decay_groups(model, weight_decay):
    """AdamW groups: decay only tensors with ndim >= 2 (norm scales and biases are 1-D) whose name holds
    none of NO_DECAY_NAMES."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            skip = p.ndim < 2 or any(word in name for word in NO_DECAY_NAMES)
            (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(progress, warmup):
    """Learning-rate factor at fractional progress in [0, 1]: linear warm-up over the first `warmup`
    fraction, then half-cosine to 0 (`main_reconstruction.py`)."""
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / max(1e-8, 1.0 - warmup)))


def significant(x, digits=3):
    """x to `digits` significant figures, written out in full (1070, not 1.07e+03; 0.0123)."""
    return np.format_float_positional(float(f"{x:.{digits}g}"), trim="-")


def saved_bytes(forward, n, device):
    """Bytes of activations autograd keeps for backward after `forward(n)` (a loss on n samples), under the
    bf16 autocast of a CUDA run. On CUDA: what the allocator holds once the forward is done, less what it
    held before. On the CPU: the unique storages of the tensors autograd saves, leaving out trainable
    parameters (saved as they are, not copied)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        with autocast(device):
            loss = forward(n)
        torch.cuda.synchronize(device)
        held = torch.cuda.memory_allocated(device) - before
        del loss
        return held
    storages = {}

    def pack(t):
        if not (t.is_leaf and t.requires_grad):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        loss = forward(n)
    del loss
    return sum(storages.values())


def activation_mib_per_sample(forward, device):
    """MiB of activations a training step keeps per sample: saved_bytes at batch 2 less at batch 1, so that
    what does not grow with the batch (autocast's bf16 copies of the weights) cancels."""
    return (saved_bytes(forward, 2, device) - saved_bytes(forward, 1, device)) / 2**20


def state_gib(modules, optimizers):
    """GiB a run holds whatever its batch: the parameters and buffers of `modules` (unique storages, so a
    module passed twice counts once), a gradient per trainable parameter, the optimizers' states."""
    storages, grads = {}, {}
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        grads.update({p.data_ptr(): p.numel() * p.element_size() for p in m.parameters() if p.requires_grad})
    for opt in optimizers:
        for t in (v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return (sum(storages.values()) + sum(grads.values())) / 2**30


class Bench:
    """--bench N, the one benchmark rule of every trainer: N steps, nothing written; the first step is
    warm-up (allocation, autotuning) and not timed. Its last line gives, as key=value pairs, the median step
    time, images/s (three significant figures), peak memory, the memory that does not depend on the batch
    (state_gib: weights, gradients, optimizer states, EMA, frozen nets), the activations kept per sample
    (act_mib_per_sample, see activation_mib_per_sample) and their sum for one micro-batch of this run
    (est_gib_per_gpu = state + micro-batch x activations): what a user needs to choose --batch-size,
    --grad-accum and --grad-checkpoint for a card. Only this mode synchronises CUDA after each step."""

    def __init__(self, device):
        self.device, self.times, self.last, self.images = device, [], None, 0

    def tick(self, images):
        """After each step; `images` is the step's global batch."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last, self.images = now, images

    def report(self, name, memory):
        """`memory`: (modules, optimizers, forward, micro-batch) of the run, forward(n) a training loss on n
        of the last batch's samples (None where the batch has fewer than 2)."""
        if not self.times:
            log(f"{name} bench: nothing timed; use --bench 2 or more (the first step is warm-up)")
            return None
        step = statistics.median(self.times)
        modules, optimizers, forward, batch = memory
        result = {"step_s": step, "images_per_s": self.images / step, "peak_mem_gb": peak_memory_gb(self.device),
                  "state_gib": state_gib(modules, optimizers)}
        if forward is not None:
            result["act_mib_per_sample"] = activation_mib_per_sample(forward, self.device)
            result["est_gib_per_gpu"] = result["state_gib"] + batch * result["act_mib_per_sample"] / 1024
        log(f"{name} bench: {len(self.times)} steps timed after 1 warm-up, micro-batch {batch}: "
            + " ".join(f"{k}={significant(v)}" for k, v in result.items()))
        return result


class Throughput:
    """images/s since the last report, and peak memory (one log line per interval, no per-step syncs)."""

    def __init__(self, device):
        self.device, self.t0, self.seen = device, time.time(), 0

    def add(self, n):
        self.seen += n

    def report(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # at logging time only, never inside a step
        now = time.time()
        line = f"{self.seen / (now - self.t0):.1f} img/s peak mem {peak_memory_gb(self.device):.2f} GB"
        self.t0, self.seen = now, 0
        return line


# ----- command lines: run flags and the one preset mechanism -----


#: loader workers per process in the paper presets of the stages that decode images: an ImageNet JPEG
#: costs a worker about 5 ms to decode and crop to 256 px, so the default 2 would cap a GPU near 400 img/s
IMAGE_WORKERS = 8


def bounded(kind, low, high=None, above=False):
    """The one rule for a number on the command line: an argparse type that takes a finite `kind` (int or
    float) at least `low` (above it with `above`) and at most `high`, and refuses anything else at the
    command line rather than deep in a run. --help prints the bound beside the flag (HelpFormatter)."""
    rule = (f"in [{low}, {high}]" if high is not None else f"above {low}" if above else f"at least {low}")

    def parse(text):
        value = kind(text)
        if not (math.isfinite(value) and (value > low if above else value >= low) and (high is None or value <= high)):
            raise argparse.ArgumentTypeError(f"{text}: must be {rule}")
        return value

    parse.__name__, parse.rule = kind.__name__, rule
    return parse


#: counts and sizes (batches, images, epochs, widths, log interval): a 0 divided by zero, or took no batch
positive_int = bounded(int, 1)
#: step numbers and cadences, where 0 means "not at all" (--stop-at, --bench, --ckpt-every, ...)
non_negative_int = bounded(int, 0)
#: learning rates and the gradient clip: at 0 nothing trains, below it the loss climbs (--clip -1)
positive = bounded(float, 0, above=True)
#: loss weights, weight decay, the flow's gamma: 0 turns a term off, a negative one trains the wrong way
non_negative = bounded(float, 0)
#: EMA decays, warm-up and dropout fractions: an EMA decay of 1.5 extrapolated away from the model
fraction = bounded(float, 0, 1)


def add_run_flags(p, ckpt_every=None, save_every=None, save_unit=None, train=True):
    """The run-control flags every stage shares; the checkpoint cadence flags only for the stages that
    checkpoint by step (the stand-in teacher writes one per epoch); --stop-at and --bench for trainers."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=non_negative_int, default=2, help="data-loading processes per rank")
    p.add_argument("--log-every", type=positive_int, default=20)
    if not train:
        return
    if ckpt_every is not None:
        p.add_argument("--ckpt-every", type=non_negative_int, default=ckpt_every,
                       help="write latest.pt every N steps, and at the end of every epoch")
        p.add_argument("--save-every", type=non_negative_int, default=save_every,
                       help=f"keep a milestone copy every N {save_unit}")
    p.add_argument("--stop-at", type=non_negative_int, default=0, help="checkpoint and exit at this step (job limits)")
    p.add_argument("--bench", type=non_negative_int, default=0, help="time this many steps, write nothing")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (the first "
                   "steps build kernels: a minute or so)")


def only_with(action, setting, on):
    """Declare, where a flag is defined, that it acts only while `setting` holds (`on(args)`): --help says so
    beside the flag, and parse_with_preset refuses the flag, set, while the setting is off (a flag taken
    and ignored misleads: the run does something else than the command line says)."""
    action.only = setting, on
    return action


def split_mode(argv, modes):
    """`FILE.py [MODE] [flags]` -> (the mode, the flags); no mode given is the first of `modes`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return (argv.pop(0), argv) if argv and argv[0] in modes else (modes[0], argv)


def refuse(parser, *rules):
    """A command line's checks that span flags, one (broken, message) each: the first broken one fails."""
    for broken, message in rules:
        if broken:
            parser.error(message)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help prints the module docstring as written and every flag's value in force (the preset's), its
    bound (`bounded`) and the setting it acts under (`only_with`)."""

    def _format_action(self, action):
        notes = [f"(must be {action.type.rule})" if hasattr(action.type, "rule") else "",
                 f"(only with {action.only[0]})" if hasattr(action, "only") else ""]
        if action.option_strings and (any(notes) or not action.help):
            action = copy.copy(action)  # the defaults formatter skips flags without help
            action.help = " ".join(filter(None, [action.help, *notes, "(default: %(default)s)"]))
        return super()._format_action(action)


def parse_with_preset(build, preset_defaults, argv=None):
    """The one preset mechanism of every stage: `build(add_help)` makes the stage's parser; a first pass
    reads the choices that pick a preset (--preset, --protocol), `preset_defaults(first)` gives the preset's
    values, and they become the parser's defaults: an explicit flag overrides them, and --help prints them.
    A flag set away from its default while its `only_with` setting is off fails. Returns (parser, args)."""
    first, _ = build(add_help=False).parse_known_args(argv)
    parser = build(add_help=True)
    dests = {a.dest for a in parser._actions}
    parser.set_defaults(**{k: v for k, v in preset_defaults(first).items() if k in dests})
    args = parser.parse_args(argv)
    ignored = [a for a in parser._actions if hasattr(a, "only") and not a.only[1](args)
               and getattr(args, a.dest) != parser.get_default(a.dest)]
    if ignored:
        setting = ignored[0].only[0]
        flags = " ".join(a.option_strings[0] for a in ignored if a.only[0] == setting)
        parser.error(f"{flags}: only with {setting}; set it, or leave them out")
    return parser, args


# ----- weights from files and URLs (a safetensors reader of our own) -----


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def load_safetensors(path):
    """Read a .safetensors file: 8 bytes little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets}}, then the raw little-endian tensor bytes."""
    with open(path, "rb") as f:
        buf = bytearray(f.read())
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        count = (end - start) // torch.empty((), dtype=dtype).element_size()
        flat = (torch.frombuffer(buf, dtype=dtype, offset=8 + n + start, count=count) if count
                else torch.empty(0, dtype=dtype))
        out[name] = flat.reshape(info["shape"])
    return out


def resolve_weights(weights, arch):
    """A teacher's weights: a local path, a URL, or None for the architecture's public default."""
    weights = weights or default_weights_url(arch)
    if weights is None:
        raise FileNotFoundError(f"no weights given for {arch}. {DINOV3_HELP}")
    return fetch(weights, DINOV3_HELP if arch.startswith("dinov3") else "download it elsewhere and pass its path")


def is_url(path):
    """Whether a weights flag names a file to download (file:// serves tests and mirrors on shared disks)."""
    return path.startswith(("http://", "https://", "file://"))


def fetch(weights, help_):
    """A local file as it is, or a URL downloaded once into torch.hub's cache ($TORCH_HOME/hub/checkpoints):
    by the first process of each machine while the others wait (every process calls this), not by all of
    them at once. `help_` says where else to get the file when that fails (offline, or the URL is gone)."""
    if not is_url(weights):
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"weights not found: {weights}. {help_}")
        return weights
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights))
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and not os.path.isfile(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        try:
            torch.hub.download_url_to_file(weights, cached, progress=False)
        except Exception as e:
            raise RuntimeError(f"could not download {weights} ({e}). {help_} "
                               f"(or place the file at {cached})") from None
    barrier()
    return cached


def read_state_dict(path, prefix=""):
    """Tensors of a .safetensors or .pth file; `prefix` selects a sub-module (e.g. the teacher held in a
    RecTok stage-1 checkpoint under 'sem_foundation_models.dinov3.')."""
    if path.endswith(".safetensors"):
        sd = load_safetensors(path)
    else:
        sd = load_checkpoint(path, ("teacher",), "teacher weights (.pth or .safetensors)")
        for key in ("model", "teacher", "state_dict"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


#################################################################################
#            The stand-in teacher's training run and the command line           #
#################################################################################


PRESETS = {
    # Minutes on a 2-core CPU: 32 px synthetic images, patch 4 (an 8 x 8 grid, like the tiny tokenizer).
    "tiny": dict(image_size=32, patch_size=4, width=128, depth=2, heads=4, epochs=6, batch_size=64,
                 lr=2e-3, num_train=6000, num_val=1000),
    # A ViT-S/16 teacher for a new domain at 256 px.
    "paper": dict(image_size=256, patch_size=16, width=384, depth=12, heads=6, epochs=100, batch_size=128,
                  lr=5e-4, num_train=None, num_val=None, workers=IMAGE_WORKERS),
}


@torch.no_grad()
def evaluate(model, loader, device):
    """Held-out top-1 accuracy over every rank's shard. BatchNorm's running statistics differ per rank (DDP
    broadcasts rank 0's before each forward, then each rank's batch updates its own, and the EMA copies
    them): every rank evaluates with rank 0's, the ones a checkpoint keeps."""
    broadcast_module(model)
    model.eval()
    counts = torch.zeros(2, device=device)  # correct, seen
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        counts += torch.stack([(model(x).argmax(-1) == y).sum(), y.new_tensor(y.numel())])
    if is_distributed():
        dist.all_reduce(counts)
    return (counts[0] / counts[1].clamp(min=1)).item()


def train_standin(args):
    rank, world, device = setup_distributed()
    if rank == 0 and not args.bench:
        prepare_out_dir(args.out)
    torch.manual_seed(args.seed * world + rank)
    train_set, val_set = train_val(args.data, args.image_size, args.val_data, args.num_train, args.num_val,
                                   args.seed, args.skip_bad_images)
    config = {"vit": standin_vit(vars(args)), "num_classes": train_set.num_classes}
    model = StandinClassifier(**config).to(device)
    ema = make_ema(model)
    enable_tf32(device)
    if args.compile:
        compile_blocks(model, Block)
    ddp = nn.parallel.DistributedDataParallel(model) if is_distributed() else model
    opt = torch.optim.AdamW(weight_decay_groups(model, 0.05), lr=args.lr, betas=(0.9, 0.95), fused=True)
    loader, sampler = make_loader(train_set, args.batch_size, args.seed, rank, world, args.workers, device)
    val_loader = torch.utils.data.DataLoader(shard(val_set, rank, world), batch_size=args.batch_size,
                                             num_workers=args.workers, persistent_workers=args.workers > 0,
                                             collate_fn=collate)
    flip_gen = torch.Generator().manual_seed(args.seed * world + rank)
    run = Run(args, "teacher", device, len(train_set), args.batch_size * world,
              {"model": model, "ema": ema, "optimizer": opt}, {"flip_rng": flip_gen}, match={"config": config},
              check={"stand-in teacher": model})
    log(f"stand-in teacher: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{len(train_set)} train / {len(val_set)} val images, {train_set.num_classes} classes, {run.total} steps")
    final_path = os.path.join(args.out, "teacher.pt")
    if run.step >= run.stop and (run.step < run.total or os.path.isfile(final_path)):
        cleanup_distributed()
        return None
    acc = None
    while run.step < run.stop:
        epoch, in_epoch = divmod(run.step, run.steps_per_epoch)
        sampler.set_position(epoch, in_epoch)
        model.train()
        for x, y in loader:
            x = random_flip(x.to(device, non_blocking=True), flip_gen)
            y = y.to(device, non_blocking=True)
            for g in opt.param_groups:
                g["lr"] = args.lr * warmup_cosine(run.step / run.total, 0.1)
            with autocast(device):
                loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            update_ema(ema, model, 0.99)
            run.tick(x.shape[0] * world, loss)
            if run.log_due():
                log(f"step {run.step}/{run.total} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e} "
                    f"{run.meter.report()}")
            if run.step >= run.stop:
                break
        if run.bench:
            continue  # no evaluation or checkpoint while benchmarking
        acc = evaluate(ema, val_loader, device)
        log(f"epoch {epoch + 1} step {run.step}: held-out accuracy (EMA) {acc * 100:.2f}%")
        run.save(accuracy=acc)  # once per epoch (and at --stop-at)
    if run.bench:
        forward = (lambda n: F.cross_entropy(model(x[:n]), y[:n])) if len(x) > 1 else None  # the activation count
        result = run.done("stand-in teacher", forward)
        cleanup_distributed()
        return result
    if run.step >= run.total:
        if acc is None:  # finished before, killed before teacher.pt was written
            acc = evaluate(ema, val_loader, device)
        if rank == 0:
            mean, std = token_statistics(ema.vit, train_set, args.batch_size, device)
            atomic_save(run.record(("model", "ema"), accuracy=acc, target_mean=mean, target_std=std), final_path)
            log(f"wrote {final_path} (held-out accuracy {acc * 100:.2f}%)")
    cleanup_distributed()
    return acc


@torch.no_grad()
def token_statistics(vit, dataset, batch_size, device, num=2000):
    """Per-channel mean and std of the patch tokens over (up to) `num` training images."""
    subset = torch.utils.data.Subset(dataset, range(min(num, len(dataset))))
    tokens = torch.cat([vit.patch_tokens(x.to(device)).flatten(0, 1).double().cpu()  # B x L x D -> (B L) x D
                        for x, _ in torch.utils.data.DataLoader(subset, batch_size, collate_fn=collate)])
    return tokens.mean(0).float(), tokens.std(0).clamp(min=1e-6).float()


@torch.no_grad()
def check_teacher(args):
    """`distill.py check ARCH`: load an official teacher's weights and print what the tokenizer would
    receive from it for a few built-in images."""
    teacher = build_teacher(args.arch, args.weights, grid=args.image_size // 16)
    data = build_dataset("synthetic", args.image_size, "val", 4)
    x = torch.stack([data[i][0] for i in range(4)])
    t = teacher(x)
    print(f"{args.arch}: targets {tuple(t.shape)}, mean {t.mean():.4f}, std {t.std():.4f}")


def build_parser(add_help=True):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, add_help=add_help)
    p.add_argument("--data", default="synthetic", help="'synthetic' (built-in) or an ImageNet-style folder")
    p.add_argument("--val-data", default=None, help="held-out class folder (default: every 50th image)")
    p.add_argument("--skip-bad-images", action="store_true", help="leave out (and count) unreadable files")
    p.add_argument("--out", default=RUNS["teacher"], help="run folder (resumes from OUT/latest.pt)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="sets the defaults below")
    for k in ("image_size", "patch_size", "width", "depth", "heads", "epochs", "batch_size", "num_train",
              "num_val"):
        p.add_argument("--" + k.replace("_", "-"), type=positive_int)
    p.add_argument("--lr", type=positive)
    add_run_flags(p)
    return p


def build_check_parser():
    p = argparse.ArgumentParser(prog="distill.py check", description=check_teacher.__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("arch", choices=sorted(ARCHS), help="an official teacher")
    p.add_argument("--weights", default=None, help="a .pth/.safetensors path or URL (default: the public one)")
    p.add_argument("--image-size", type=positive_int, default=256)
    return p


def parse_args(argv=None):
    """`distill.py [train | check] [flags]`; no mode means train (the stand-in teacher)."""
    mode, argv = split_mode(argv, ("train", "check"))
    if mode == "check":
        args = build_check_parser().parse_args(argv)
        args.mode = mode
        return args
    p, args = parse_with_preset(build_parser, lambda first: PRESETS[first.preset], argv)
    args.mode = mode
    refuse(p, (args.patch_size & (args.patch_size - 1),
               f"--patch-size {args.patch_size}: a power of 2 (the stem halves the image log2(patch) times)"),
           (args.width % args.heads or args.width // args.heads % 4,
            f"--width {args.width} --heads {args.heads}: width / heads a multiple of 4 (the 2D RoPE)"))
    return args


@stage
def main(argv=None):
    args = parse_args(argv)
    return check_teacher(args) if args.mode == "check" else train_standin(args)


if __name__ == "__main__":
    main()
