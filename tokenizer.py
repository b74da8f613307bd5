"""RecTok tokenizer: model, losses, both training stages, evaluation and the latent cache
(`models/rectok.py`, `utils/losses.py`, `main_reconstruction.py`).

RecTok encodes an image into a grid of C-channel latent tokens (a KL posterior) and trains on the FORWARD
FLOW of those latents: the pixel decoder and a small semantic decoder both read
z_tau = (1 - tau) * z + tau * eps, tau = shift(U(0, 1)), so that the latent a diffusion model later sees
at every noise level is one the tokenizer was trained to keep meaningful. The semantic decoder predicts a
frozen teacher's patch features (distill.py) from z_tau: at visible tokens it aligns (flow semantic
distillation, FSD), at MAE-masked tokens it reconstructs (reconstruction-alignment distillation, RAD).

File layout, top to bottom: the transformer parts with the released 2D RoPE; the model in forward order
(masking, encoder, posterior, `shift`, `forward_flow`, pixel decoder, semantic decoder, RecTok); loading the
authors' checkpoints; the losses (MSE, LPIPS-VGG16, ConvNeXt-S logits, PatchGAN, KL, cosine); the training
run of both stages; evaluation; the latent cache; the command line. Images come from distill.py.

Modes, each with only its own flags (`python tokenizer.py MODE -h` prints them with the preset's values):
    train      stage 1 (the default when no mode is given)
    finetune   stage 2, the paper's decoder fine-tuning, from a stage-1 checkpoint (--init)
    evaluate   PSNR (and --rfid) of a tokenizer (--ckpt) on held-out images
    encode     the latent cache of a data set, for dit.py and probe.py (files.txt names each latent's image)
    reconstruct  your folder through a tokenizer: a PNG per image, same relative names, and psnr.csv

Run:
    python tokenizer.py                                    # built-in data, tiny preset, stand-in teacher
    python tokenizer.py --sem-decoder none --out runs/tokenizer_nosem      # ablation: no FSD / RAD
    torchrun --nproc_per_node=8 tokenizer.py --preset paper --data /imagenet/train \\
        --teacher dinov3_vitl16 --teacher-weights /weights/dinov3_vitl16_pretrain_lvd1689m.pth
    python tokenizer.py --preset paper --bench 10 --batch-size 2 --random-weights   # timed, writes nothing
    python tokenizer.py finetune --preset paper --bench 10 --batch-size 2 --random-weights   # stage 2, the same
    python tokenizer.py reconstruct --ckpt RecTok_decft.pth --data ~/photos --out runs/reconstruct

Writes OUT/latest.pt (every --ckpt-every steps and every epoch; a run started in a folder with latest.pt
resumes it exactly), OUT/epoch_NNNN.pt milestones, and OUT/recon_STEP.png grids (held-out originals above
EMA reconstructions). A checkpoint is {"kind": "tokenizer", "config", "model", "ema", "optimizer",
"discriminator", "d_optimizer", "step", "epoch", "global_batch", "args", "rng", "flip_rng"}, which loads
with weights_only=True (`distill.load_checkpoint`); later stages rebuild the tokenizer from "config" and
"ema" (`load_tokenizer`), which also reads the authors' RecTok.pth / RecTok_decft.pth.
"""
import argparse
import collections
import contextlib
import errno
import hashlib
import json
import math
import os
import random

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import distill
import fid
from distill import only_with as only


#################################################################################
#                     Transformer parts (`models/rectok.py`)                    #
#################################################################################

#: width, layers, heads of each size (`models/rectok.py`); "micro" and "mini" are ours, for the CPU demo only
SIZES = {"micro": (64, 1, 2), "mini": (128, 2, 4), "tiny": (192, 3, 4), "small": (512, 8, 8),
         "base": (768, 12, 12), "large": (1024, 24, 16)}


def rope_table(grid, head_dim):
    """The released 2D RoPE table (`models/rectok.py`), (grid*grid, 2*head_dim) = [cos | sin].

    f_k = 7 * (7/7e-4)^(-k/(d/4-1)), k < d/4, laid out [f, f] (not interleaved); the first d/2 channels
    turn with the row coordinate and the last d/2 with the column one; coordinates are linspace(0, 1)."""
    quarter = head_dim // 4
    f = 7.0 * (7.0 / 7e-4) ** (-torch.arange(quarter, dtype=torch.float64) / (quarter - 1))
    freqs = torch.cat([f, f])
    coords = torch.linspace(0, 1, grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    # rows, cols: grid x grid -> (grid grid) x 1; angles: (grid grid) x d, [row angles | column angles]
    angles = 2 * math.pi * torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=-1)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


def apply_rope(x, rope):
    """x: (B, H, N, d); rope: (N, 2d) or, for masked sequences, (B, N, 2d)."""
    cos, sin = rope.chunk(2, dim=-1)
    if rope.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return x * cos + distill.rotate_adjacent(x) * sin


class Block(nn.Module):
    """Pre-norm block: x += attn(rmsnorm(x)); x += swiglu(rmsnorm(x))."""

    def __init__(self, width, heads):
        super().__init__()
        self.norm1 = nn.RMSNorm(width, eps=1e-6)
        self.attn = distill.Attention(width, heads)
        self.norm2 = nn.RMSNorm(width, eps=1e-6)
        self.mlp = distill.swiglu(width)

    def forward(self, x, rope):
        x = x + self.attn(self.norm1(x), lambda t: apply_rope(t, rope))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Position embedding, RMSNorm, blocks with RoPE, RMSNorm: the trunk every RecTok net shares."""

    def __init__(self, size, grid):
        super().__init__()
        width, layers, heads = SIZES[size]
        self.width = width
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(1, grid * grid, width))
        self.ln_pre = nn.RMSNorm(width, eps=1e-6)
        self.transformer = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_post = nn.RMSNorm(width, eps=1e-6)
        self.register_buffer("rope", rope_table(grid, width // heads), persistent=False)
        self.grad_checkpoint = False  # distill.enable_grad_checkpoint

    def blocks(self, x, rope):
        x = self.ln_pre(x)
        x = distill.run_blocks(self.transformer, x, rope, checkpoint=self.grad_checkpoint and self.training)
        return self.ln_post(x)


def unmask(x, token, ids_restore):
    """Put `token` at every dropped position and restore image order (RAD's input, `models/rectok.py`);
    an unmasked sequence (ids_restore None) passes as it is."""
    if ids_restore is None:
        return x
    B, keep, D = x.shape
    fill = token.to(x.dtype).expand(B, ids_restore.shape[1] - keep, D)
    x = torch.cat([x, fill], dim=1)
    return torch.gather(x, 1, ids_restore[:, :, None].expand(-1, -1, D))


#################################################################################
#                  The tokenizer: encoder, posterior, flow, decoders            #
#################################################################################


def keep_count(num_tokens, ratio):
    """Tokens an MAE mask of `ratio` keeps: ceil(L * (1 - ratio)) (`models/rectok.py`; 10 of 16 at 0.4)."""
    return math.ceil(num_tokens * (1 - ratio))


def mae_ids(noise, len_keep):
    """MAE masking ids (`models/rectok.py`): argsort uniform noise; keep the first len_keep."""
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle[:, :len_keep], ids_restore


class Encoder(Transformer):
    """Conv patchify -> + pos -> MAE masking (training) -> RMSNorm -> blocks -> RMSNorm -> latent_head
    Linear(D, 2C) = posterior moments [mean | logvar] (`models/rectok.py`). No CLS token, no registers."""

    def __init__(self, size, img_size, patch_size, channels):
        super().__init__(size, img_size // patch_size)
        self.patch_embed = nn.Conv2d(3, self.width, patch_size, patch_size)
        self.latent_head = nn.Linear(self.width, 2 * channels)
        distill.init_weights(self)

    def forward(self, x, ids_keep=None, return_features=False):
        # B x D x h x w -> B x L x D, tokens in row-major order
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.positional_embedding
        rope = self.rope
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, x.shape[-1]))
            rope = rope[ids_keep]  # the RoPE rows travel with their tokens
        features = self.blocks(x, rope)
        moments = self.latent_head(features)
        return (moments, features) if return_features else moments


class Posterior:
    """Diagonal Gaussian over tokens (`models/rectok.py`): moments = [mean | logvar], logvar clamped to
    [-30, 20]."""

    def __init__(self, moments):
        self.mean, logvar = moments.float().chunk(2, dim=-1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, eps=None):
        eps = torch.randn_like(self.mean) if eps is None else eps
        return self.mean + self.std * eps

    def kl(self):
        """Per sample: 0.5 * sum over (visible) tokens and channels of mean^2 + var - 1 - logvar."""
        return 0.5 * (self.mean ** 2 + self.std ** 2 - 1.0 - self.logvar).sum(dim=(1, 2))


def shift(u, s):
    """The dimension-dependent shift: s*u / (1 + (s-1)*u); for s > 1 it pushes samples toward noise."""
    return s * u / (1 + (s - 1) * u)


def latent_shift(grid, channels):
    """s = sqrt(h*w*C / 4096): 2.828 for C = 128 at a 16 x 16 grid."""
    return math.sqrt(grid * grid * channels / 4096)


def flow_tau(draw, schedule, s):
    """Per-sample noise level from its draw (`models/rectok.py` RecTok.encode): shift(u, s) ("shift") or u
    ("uniform") for u ~ U(0, 1), sigmoid(n) for n ~ N(0, 1) ("lognorm")."""
    if schedule == "lognorm":
        return torch.sigmoid(draw)
    return shift(draw, s) if schedule == "shift" else draw


def forward_flow(z, tau, eps, gamma):
    """The forward flow the tokenizer trains along (FSD): z_tau = (1 - tau) * z + tau * gamma * eps. Tokenizer
    time: tau = 0 is the clean latent, tau = 1 noise (the generator's t runs the other way, see dit.py)."""
    return (1 - tau) * z + tau * gamma * eps


class PixelDecoder(Transformer):
    """Linear(C, D) -> mask tokens at dropped positions -> + pos -> RMSNorm -> blocks -> RMSNorm -> 1x1 conv
    to p*p*3 -> depth-to-space "(p1 p2 c)" -> 3x3 conv (`models/rectok.py`). No output activation."""

    def __init__(self, size, img_size, patch_size, channels):
        super().__init__(size, img_size // patch_size)
        self.patch_size, self.grid = patch_size, img_size // patch_size
        self.decoder_embed = nn.Linear(channels, self.width)
        self.mask_token = nn.Parameter(self.width ** -0.5 * torch.randn(1, 1, self.width))
        self.to_pixels = nn.Conv2d(self.width, patch_size * patch_size * 3, 1)
        self.conv_out = nn.Conv2d(3, 3, 3, padding=1)
        distill.init_weights(self)

    def forward(self, z, ids_restore=None):
        x = unmask(self.decoder_embed(z), self.mask_token, ids_restore)
        x = self.blocks(x + self.positional_embedding, self.rope)
        B, p, g = x.shape[0], self.patch_size, self.grid
        x = self.to_pixels(x.transpose(1, 2).reshape(B, -1, g, g).contiguous())  # NCHW strides for DDP buckets
        # depth-to-space, channel order "(p1 p2 c)": B x (p p 3) x g x g -> B x p x p x 3 x g x g
        # -> B x 3 x g x p x g x p -> B x 3 x (g p) x (g p)
        x = x.reshape(B, p, p, 3, g, g).permute(0, 3, 4, 1, 5, 2).reshape(B, 3, g * p, g * p)
        return self.conv_out(x)


class SemanticDecoder(Transformer):
    """FSD + RAD (`models/rectok.py`): from the noisy, partly masked latent z_tau, predict the teacher's features
    at ALL positions: aligned at visible ones (FSD), reconstructed at masked ones (RAD, via the zero-init
    mask embedding). Keeps PyTorch's default init [code]."""

    def __init__(self, size, img_size, patch_size, channels, teacher_dim):
        super().__init__(size, img_size // patch_size)
        self.token_embedding = nn.Linear(channels, self.width)
        self.mask_embedding = nn.Parameter(torch.zeros(1, 1, self.width))
        self.out = nn.Linear(self.width, teacher_dim)

    def forward(self, z_tau, ids_restore=None):
        x = unmask(self.token_embedding(z_tau), self.mask_embedding, ids_restore)
        return self.out(self.blocks(x + self.positional_embedding, self.rope))


class MLPSemanticDecoder(nn.Module):
    """Ablation (`models/rectok.py` MLPDecoder): Linear(C, 4C) -> GELU -> Linear(4C, D) on each token of
    z_tau, PyTorch's default init. It has no context and no mask embedding, so it predicts no masked token:
    no RAD, and it trains with masking off (check_config), as the authors' MLP run did."""

    def __init__(self, channels, teacher_dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, teacher_dim))

    def forward(self, z_tau, ids_restore=None):
        return self.mlp(z_tau)


def check_config(img_size, patch_size, noise_schedule, mask_ratio, mask_ratio_min, sem_decoder="transformer"):
    """The settings RecTok cannot be built with fail with what to change (tokenizer.py checks its flags
    with it before any work: a stand-in teacher to train, a teacher to load)."""
    if sem_decoder == "mlp" and mask_ratio != 0:
        # The authors' MLPDecoder ignores ids_restore: under masking it returns the visible tokens only,
        # and their loss against all L targets fails; their MLP ablation ran with masking off.
        raise ValueError(f"--sem-decoder mlp with mask ratio {mask_ratio}: the MLP decoder has no mask "
                         f"embedding and predicts no masked token (no RAD); add --mask-ratio 0")
    if img_size % patch_size:
        raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
    if noise_schedule not in ("shift", "uniform", "lognorm"):
        raise ValueError(f"noise schedule {noise_schedule!r}: choose shift, uniform or lognorm")
    if not (0 <= mask_ratio < 1 and mask_ratio_min <= mask_ratio):
        raise ValueError(f"mask ratios {mask_ratio_min}..{mask_ratio}: need mask_ratio_min <= mask_ratio < 1 "
                         f"(a ratio of 1 keeps no token for the encoder; 0 turns masking off)")


class RecTok(nn.Module):
    """The RecTok tokenizer (`models/rectok.py`). forward() is the stage-1 training pass; encode()/decode() are the
    evaluation paths (posterior mean, no masking, no noise)."""

    def __init__(self, img_size=256, patch_size=16, channels=128, encoder_size="base",
                 decoder_size="base", sem_size="tiny", sem_decoder="transformer", teacher_dim=1024,
                 mask_ratio=0.4, mask_ratio_min=-0.1, noise_schedule="shift", gamma=1.0):
        super().__init__()
        check_config(img_size, patch_size, noise_schedule, mask_ratio, mask_ratio_min, sem_decoder)
        self.img_size, self.grid, self.channels = img_size, img_size // patch_size, channels
        self.mask_ratio, self.mask_ratio_min = mask_ratio, mask_ratio_min
        self.noise_schedule, self.gamma = noise_schedule, gamma
        self.s = latent_shift(self.grid, channels)  # the shift factor of shift(u, s)
        self.encoder = Encoder(encoder_size, img_size, patch_size, channels)
        self.decoder = PixelDecoder(decoder_size, img_size, patch_size, channels)
        self.sem_decoder = None
        if sem_decoder == "transformer":
            self.sem_decoder = SemanticDecoder(sem_size, img_size, patch_size, channels, teacher_dim)
        elif sem_decoder == "mlp":
            self.sem_decoder = MLPSemanticDecoder(channels, teacher_dim)
        if mask_ratio == 0:
            # Masking off (stage 2, or the no-RAD ablation): the mask tokens are never read, so they are not
            # trained, and DDP needs no find_unused_parameters traversal for them.
            for name, p in self.named_parameters():
                if name.endswith(("mask_token", "mask_embedding")):
                    p.requires_grad_(False)

    # ----- stage 1 (`models/rectok.py`) -----
    def draw_mask_ratio(self):
        """One ratio per batch, r = max(0, U(mask_ratio_min, mask_ratio)) with Python's random (so 20% of
        batches are unmasked at the defaults)."""
        return max(0.0, random.uniform(self.mask_ratio_min, self.mask_ratio))

    def draw_tau(self, batch, device):
        """Per-sample noise level, one draw of shape (B, 1, 1) shared by all tokens and channels."""
        draw = (torch.randn if self.noise_schedule == "lognorm" else torch.rand)(batch, 1, 1, device=device)
        return flow_tau(draw, self.noise_schedule, self.s)

    def forward(self, x, ratio=None, mask_noise=None, eps_post=None, tau=None, eps_flow=None):
        """Stage-1 pass. Random draws default to the released order (ratio, mask noise, posterior eps,
        tau, flow eps); tests inject them. Returns the reconstruction, the posterior, the masking ids
        and the semantic prediction from z_tau."""
        B, L = x.shape[0], self.grid ** 2
        ids_keep = ids_restore = None
        if self.mask_ratio != 0:
            ratio = self.draw_mask_ratio() if ratio is None else ratio
            len_keep = keep_count(L, ratio)
            mask_noise = torch.rand(B, L, device=x.device) if mask_noise is None else mask_noise
            ids_keep, ids_restore = mae_ids(mask_noise, len_keep)
        posterior = Posterior(self.encoder(x, ids_keep))
        z = posterior.sample(eps_post)
        z_tau = z
        if self.gamma > 0:  # gamma 0 turns the flow off (`models/rectok.py`: `if self.gamma > 0`)
            tau = self.draw_tau(B, x.device) if tau is None else tau
            eps_flow = torch.randn_like(z) if eps_flow is None else eps_flow
            z_tau = forward_flow(z, tau, eps_flow, self.gamma)
        decoded = self.decoder(z_tau.to(x.dtype), ids_restore)  # BOTH decoders read z_tau
        sem = self.sem_decoder(z_tau.to(x.dtype), ids_restore) if self.sem_decoder is not None else None
        return {"decoded": decoded, "posterior": posterior, "ids_restore": ids_restore, "sem_pred": sem,
                "z": z, "z_tau": z_tau, "tau": tau}

    # ----- evaluation paths (`models/rectok.py`): clean, unmasked images, no noise -----
    def moments(self, x):
        """Posterior moments [mean | logvar] (B, L, 2C) of images x in [-1, 1]: what the latent cache keeps."""
        return self.encoder(x)

    def encode(self, images, sample=False, generator=None):
        """Images -> the latent the decoder reads, (B, C, h, w): the posterior mean, or a draw from the
        posterior with `sample` (eps from `generator`). Images are uint8 (B, 3, H, W) in [0, 255] or float in
        [-1, 1], at the size the tokenizer was trained on, on any device (moved to the model's)."""
        posterior = Posterior(self.moments(self.as_input(images)))
        z = posterior.mean
        if sample:
            z = posterior.sample(torch.randn(z.shape, generator=generator).to(z.device))
        # B x L x C -> B x C x h x w
        return z.transpose(1, 2).reshape(z.shape[0], self.channels, self.grid, self.grid)

    def decode(self, z):
        """A latent (B, C, h, w) -> images (B, 3, H, W) in [0, 1]."""
        tokens = z.flatten(2).transpose(1, 2)  # B x C x h x w -> B x L x C
        return (self.decoder(tokens.to(self.param_dtype())) * 0.5 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def reconstruct(self, x):
        """decode(encode(x)): images in [-1, 1] -> reconstructions in [0, 1]."""
        return self.decode(self.encode(x))

    def tokenize(self, x, mu, sigma):
        """The generator's input (`main_diffusion.py`): (posterior mean - mu_c) / sigma_c, (B, C, h, w)."""
        return (self.encode(x) - per_channel(mu)) / per_channel(sigma)

    def detokenize(self, latent, mu, sigma):
        """A normalised latent (B, C, h, w) -> de-normalise -> pixel decoder -> images in [0, 1]."""
        return self.decode(latent * per_channel(sigma) + per_channel(mu))

    def param_dtype(self):
        return self.decoder.positional_embedding.dtype

    def as_input(self, images):
        """uint8 or [-1, 1] float images (B, 3, H, W) -> float [-1, 1] on the model's device, or an error that
        says what the tokenizer reads."""
        size = self.img_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"images of shape {tuple(images.shape)}: this tokenizer reads (B, 3, {size}, {size}) "
                             f"(uint8 in [0, 255] or float in [-1, 1]); center-crop and resize them first, e.g. "
                             f"distill.center_crop_adm(pil_image, {size}) as the data loaders do")
        x = images.to(self.encoder.positional_embedding.device)
        return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.to(self.param_dtype())


def per_channel(stat):
    """A per-channel latent statistic ((C,), (1, 1, C) or (1, C, 1, 1)) shaped to divide (B, C, h, w)."""
    return torch.as_tensor(stat).reshape(-1, 1, 1)


#################################################################################
#                  Loading the authors' released checkpoints                    #
#################################################################################

# Their names -> ours: Sequential indices become named modules; the semantic decoder of the (single)
# foundation model loses its dict level. The teacher they save inside stage-1 checkpoints
# ('sem_foundation_models.<name>.*') is loaded by distill.py, not here.
_OFFICIAL_RENAMES = (("patch_embed.0.", "patch_embed."), ("ffn.1.", "to_pixels."))


def from_official(sd):
    """Map a released RecTok state dict (RecTok.pth / RecTok_decft.pth 'model' or 'model_ema') to ours."""
    out = {}
    for k, v in sd.items():
        if k.startswith("sem_foundation_models.") or k in ("mean", "std"):
            continue
        if k.startswith("sem_decoders."):
            k = "sem_decoder." + k.split(".", 2)[2]
        for a, b in _OFFICIAL_RENAMES:
            k = k.replace(a, b)
        out[k] = v
    return out


def _size_name(sd, prefix):
    width = sd[prefix + "positional_embedding"].shape[-1]
    layers = len({k.split(".")[2] for k in sd if k.startswith(prefix + "transformer.")})
    for name, (w, n, _) in SIZES.items():
        if (w, n) == (width, layers):
            return name
    raise ValueError(f"no size has width {width} and {layers} layers ({prefix.rstrip('.')})")


def official_config(sd):
    """RecTok constructor arguments read off a released state dict (already in our names)."""
    channels = sd["encoder.latent_head.weight"].shape[0] // 2
    patch = sd["encoder.patch_embed.weight"].shape[-1]
    grid = math.isqrt(sd["encoder.positional_embedding"].shape[1])
    cfg = dict(img_size=grid * patch, patch_size=patch, channels=channels,
               encoder_size=_size_name(sd, "encoder."), decoder_size=_size_name(sd, "decoder."),
               sem_decoder="none", teacher_dim=0)
    if "sem_decoder.out.weight" in sd:
        cfg.update(sem_decoder="transformer", sem_size=_size_name(sd, "sem_decoder."),
                   teacher_dim=sd["sem_decoder.out.weight"].shape[0])
    elif "sem_decoder.mlp.2.weight" in sd:  # the MLP ablation, trained without masking
        cfg.update(sem_decoder="mlp", teacher_dim=sd["sem_decoder.mlp.2.weight"].shape[0], mask_ratio=0.0)
    return cfg


def load_tokenizer(path, weights="ema", device="cpu"):
    """A tokenizer checkpoint -> RecTok in eval mode on `device`, its constructor arguments at `.config`.
    Reads ours ({'config', 'ema', ...}) and the authors' RecTok.pth / RecTok_decft.pth ('model_ema' or
    'model'), strictly; `path` may be an https:// URL (downloaded once into torch.hub's cache). The caller's
    random stream is left as it was: building the net draws initial weights, and a generator run that loads
    one for its previews must train what a run without previews trains."""
    ckpt = distill.load_checkpoint(path, ("tokenizer",), "tokenizer checkpoint")
    config, sd = tokenizer_weights(ckpt, path, weights)
    with torch.random.fork_rng(devices=[]):  # the CPU stream; the net is built on the CPU
        model = RecTok(**config)
    distill.load_strict(model, sd, f"tokenizer checkpoint {path}")
    model.config = config
    return model.to(device).eval()


def tokenizer_weights(ckpt, path, weights="ema"):
    """(config, state dict in our names) of a loaded tokenizer checkpoint, ours or the authors'."""
    if "config" in ckpt:
        return ckpt["config"], ckpt[weights]
    sd = from_official(ckpt.get({"ema": "model_ema", "model": "model"}[weights], ckpt.get("model", ckpt)))
    if "encoder.latent_head.weight" not in sd:
        raise ValueError(f"{path} is not a tokenizer checkpoint: neither ours (with 'kind' and 'config') "
                         f"nor the authors' RecTok layout (no encoder.latent_head)")
    return official_config(sd), sd


#################################################################################
#                     Stage-1 losses (`utils/losses.py`)                        #
#################################################################################

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_URL = "https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/weights/v0.1/vgg.pth"
CONVNEXT_S_URL = "https://download.pytorch.org/models/convnext_small-0c510722.pth"
PERCEPTUAL_HELP = ("the perceptual loss needs torchvision's ImageNet VGG16 and ConvNeXt-S and the LPIPS "
                   "v0.1 VGG heads; pass local copies with --vgg16-weights/--lpips-weights/"
                   "--convnext-weights, or train without it with --perceptual-weight 0 (logged and "
                   "recorded in the checkpoint)")


class Frozen(nn.Module):
    """A frozen feature network: always in eval mode, no gradients to its weights."""

    def train(self, mode=True):
        return super().train(False)

    def freeze(self):
        self.requires_grad_(False)
        return self.eval()


class LPIPS(Frozen):
    """LPIPS v0.1 with VGG16 (`utils/losses.py`): inputs in [-1, 1], the scaling layer, unit-normalised relu1_2 ..
    relu5_3 features, squared differences weighted by 1x1 heads (no bias), spatial mean, summed."""

    TAPS = (3, 8, 15, 22, 29)  # the ReLU outputs that end each of the 5 slices of vgg16().features

    def __init__(self):
        super().__init__()
        # the reference's scaling layer (its `shift`, here `offset`: `shift` is the paper's time shift)
        self.register_buffer("offset", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.features = torchvision.models.vgg16().features[:30]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512))

    def taps(self, x):
        x, out = (x - self.offset) / self.scale, []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                out.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x0, x1):
        # Two passes, not one on the concatenated batch: autograd then runs VGG backward only for the input
        # that needs it (the reconstruction), not for the target as well.
        total = 0
        for lin, a, b in zip(self.lins, self.taps(x0), self.taps(x1)):
            total = total + lin((a - b) ** 2).mean(dim=(2, 3), keepdim=True)
        return total

    def load_official(self, vgg_path, heads_path):
        vgg = torch.load(vgg_path, map_location="cpu", weights_only=True)
        heads = torch.load(heads_path, map_location="cpu", weights_only=True)
        sd = {k: v for k, v in vgg.items() if k.startswith("features.") and int(k.split(".")[1]) < 30}
        sd.update({f"lins.{k[3]}.weight": v for k, v in heads.items()})  # 'linK.model.1.weight'
        sd.update(offset=self.offset, scale=self.scale)
        self.load_state_dict(sd)


class ConvNeXtLogits(Frozen):
    """ConvNeXt-S class logits of images in [0, 1]: antialiased bilinear resize to 224, ImageNet norm."""

    def __init__(self):
        super().__init__()
        self.convnext = torchvision.models.convnext_small()
        self.register_buffer("mean", torch.tensor(distill.IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(distill.IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x):
        x = F.interpolate(x, size=224, mode="bilinear", align_corners=False, antialias=True)
        return self.convnext((x - self.mean) / self.std)


class PerceptualLoss(nn.Module):
    """P = (1.0 * LPIPS + 0.1 * MSE(ConvNeXt-S logits)) / 1.1 on images in [0, 1] (`utils/losses.py`).
    Per sample (B, 1, 1, 1); the ConvNeXt term is a batch mean that broadcasts, as released."""

    def __init__(self, lpips_weight=1.0, convnext_weight=0.1):
        super().__init__()
        self.lpips, self.convnext = LPIPS().freeze(), ConvNeXtLogits().freeze()  # loading keeps them frozen
        self.lpips_weight, self.convnext_weight = lpips_weight, convnext_weight

    def forward(self, target, pred):
        lp = self.lpips(target * 2 - 1, pred * 2 - 1)
        cn = F.mse_loss(self.convnext(target), self.convnext(pred))  # separate passes, as in LPIPS
        return (self.lpips_weight * lp + self.convnext_weight * cn) / (self.lpips_weight + self.convnext_weight)

    def load_official(self, vgg16, lpips, convnext):
        fetch = distill.fetch
        self.lpips.load_official(fetch(vgg16, PERCEPTUAL_HELP), fetch(lpips, PERCEPTUAL_HELP))
        sd = torch.load(fetch(convnext, PERCEPTUAL_HELP), map_location="cpu", weights_only=True)
        self.convnext.convnext.load_state_dict(sd)
        return self


class PatchGAN(nn.Module):
    """taming's NLayerDiscriminator (released: n_layers 3, ndf 64), PyTorch default init, BatchNorm in train
    mode (the released loss module is never put in eval). Inputs in [0, 1]."""

    def __init__(self, input_nc=3, ndf=64, n_layers=3):
        super().__init__()
        widths = [ndf * min(2 ** n, 8) for n in range(n_layers + 1)]  # the last conv block keeps stride 1
        layers = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        for n, (c_in, c_out) in enumerate(zip(widths, widths[1:]), start=1):
            layers += [nn.Conv2d(c_in, c_out, 4, 2 if n < n_layers else 1, 1, bias=False), nn.BatchNorm2d(c_out),
                       nn.LeakyReLU(0.2)]
        layers += [nn.Conv2d(widths[-1], 1, 4, 1, 1)]
        self.main = nn.Sequential(*layers)

    def forward(self, x):
        return self.main(x)


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def semantic_loss(pred, target, kind="cosine"):
    """FSD/RAD loss over ALL tokens (`models/rectok.py`): mean of 1 - cos(pred, target) along features."""
    if kind == "cosine":
        return (1 - (F.normalize(pred, dim=-1) * F.normalize(target, dim=-1)).sum(-1)).mean()
    return F.mse_loss(pred, target) if kind == "l2" else F.l1_loss(pred, target)


class TokenizerLoss(nn.Module):
    """total = w_rec*MSE + w_p*P + w_kl*KL + w_sem*L_sem + w_gan*[epoch >= start]*(-mean D(recon)), in fp32 on
    images mapped to [0, 1] (`utils/losses.py`). The discriminator has its own hinge loss and optimizer."""

    def __init__(self, perceptual=None, recon_weight=1.0, perceptual_weight=1.0, kl_weight=1e-6,
                 sem_weight=1.0, sem_loss="cosine", gan_weight=0.1, gan_start_epoch=100):
        super().__init__()
        self.perceptual = perceptual if perceptual_weight > 0 else None
        self.discriminator = PatchGAN()
        self.recon_weight, self.perceptual_weight, self.kl_weight = recon_weight, perceptual_weight, kl_weight
        self.sem_weight, self.sem_loss, self.gan_weight = sem_weight, sem_loss, gan_weight
        self.gan_start_epoch = gan_start_epoch

    def gan_on(self, epoch):
        return self.gan_weight > 0 and epoch >= self.gan_start_epoch

    def generator_loss(self, x, out, sem_target, epoch):
        """Returns the total and a dict of detached terms (read only when logging: no host sync)."""
        target, recon = x.float() * 0.5 + 0.5, out["decoded"].float() * 0.5 + 0.5
        terms = {"rec": F.mse_loss(recon, target)}
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(target, recon).float().mean()
        if self.kl_weight > 0 and "posterior" in out:
            terms["kl"] = out["posterior"].kl().sum() / x.shape[0]
        if out.get("sem_pred") is not None and sem_target is not None:
            terms["sem"] = semantic_loss(out["sem_pred"].float(), sem_target, self.sem_loss)
        if self.gan_on(epoch):
            terms["gan"] = -self.discriminator(recon).float().mean()  # fp32 terms: D runs in bf16 on a GPU
        weights = {"rec": self.recon_weight, "perceptual": self.perceptual_weight, "kl": self.kl_weight,
                   "sem": self.sem_weight, "gan": self.gan_weight}
        total = sum(weights[k] * v for k, v in terms.items())
        return total, {k: v.detach() for k, v in terms.items()}

    def discriminator_loss(self, x, decoded, epoch):
        """Hinge loss on D(real) and D(recon.detach()), two separate calls (batch-stat BN each)."""
        real = self.discriminator(x.float() * 0.5 + 0.5)
        fake = self.discriminator(decoded.detach().float() * 0.5 + 0.5)
        return hinge_d_loss(real, fake)


#################################################################################
#              Stage-1 training (`main_reconstruction.py`): the main job        #
#################################################################################

PRESETS = {
    # The released recipe: 256 px, base/base, C = 128, DINOv3-L/16, 200 epochs at global batch 1024 =
    # 8 GPUs x 64 x 2 micro-batches: 26 GiB a GPU by the README's count (128 at once, 47 GiB, would fit too,
    # but the count leaves out cuDNN workspaces and fragmentation, not yet measured on a GPU).
    "paper": dict(image_size=256, patch_size=16, channels=128, encoder_size="base", decoder_size="base",
                  sem_size="tiny", teacher="dinov3_vitl16", epochs=200, batch_size=64, grad_accum=2, base_lr=1e-4,
                  gan_start_epoch=100, num_train=None, perceptual_weight=1.0, ema=0.999,
                  workers=distill.IMAGE_WORKERS),
    # Minutes on a 2-core CPU: 32 px built-in shapes, patch 4 (an 8 x 8 grid), C = 16, the stand-in
    # teacher, no perceptual loss (its ImageNet weights need a download). The GAN keeps its epoch-100
    # start, so it stays off: without the perceptual loss it overpowers a model this small. EMA 0.99:
    # at 0.999 a few hundred steps would leave the EMA weights close to their initialisation.
    # The semantic decoder is kept well below the encoder, as in the paper (a 192-wide, 3-layer decoder
    # on a 768-wide, 12-layer encoder): one as large as the encoder computes the teacher's features from
    # pixel-like latents itself and the latents learn little class. base_lr 1.6e-2 (4e-3 at batch 64):
    # a thousand steps need a large rate. 24 epochs: the reconstructions must keep the shapes for the
    # generator's samples to be recognisable (the README's "generation half" has the measurements).
    "tiny": dict(image_size=32, patch_size=4, channels=16, encoder_size="mini", decoder_size="mini",
                 sem_size="micro", teacher="standin", epochs=24, batch_size=64, grad_accum=1, base_lr=1.6e-2,
                 gan_start_epoch=100, num_train=3000, perceptual_weight=0.0, ema=0.99),
}


# Stage 2 (`finetune`, the paper's decoder fine-tuning) overrides: lr 5e-5 x batch/256, 5% warm-up, a
# fresh discriminator from step 0, 100 epochs. The tiny preset keeps the GAN off, as in its stage 1. The
# frozen encoder keeps no activations, so 128 per GPU fit 80 GB in one micro-batch.
FINETUNE = {
    "paper": dict(base_lr=5e-5, warmup=0.05, epochs=100, gan_start_epoch=0, batch_size=128, grad_accum=1),
    "tiny": dict(base_lr=1e-3, warmup=0.05, epochs=2, gan_start_epoch=100),
}


def model_config(args, teacher_dim):
    """The RecTok constructor arguments: stored as the checkpoint's `config`."""
    return dict(img_size=args.image_size, patch_size=args.patch_size, channels=args.channels,
                encoder_size=args.encoder_size, decoder_size=args.decoder_size, sem_size=args.sem_size,
                sem_decoder=args.sem_decoder, teacher_dim=teacher_dim, mask_ratio=args.mask_ratio,
                mask_ratio_min=args.mask_ratio_min, noise_schedule=args.noise_schedule, gamma=args.gamma)


def build_perceptual(args):
    if args.perceptual_weight <= 0:
        distill.log("perceptual loss OFF (--perceptual-weight 0): recorded in the checkpoint's args")
        return None
    if args.random_weights:
        return PerceptualLoss()
    return PerceptualLoss().load_official(args.vgg16_weights, args.lpips_weights, args.convnext_weights)


def build_stage1_teacher(args, grid, device):
    if args.sem_decoder == "none":
        return None
    if args.random_weights and args.teacher == "standin":  # the preset's stand-in architecture, untrained
        teacher = distill.Teacher(distill.DinoViT(**distill.standin_vit(distill.PRESETS[args.preset])), "standin",
                                  grid)
    elif args.random_weights and args.teacher in distill.ARCHS:
        teacher = distill.Teacher(distill.DinoViT(**distill.ARCHS[args.teacher]), "dino", grid,
                                  rope_jitter=not args.no_teacher_jitter)
    else:
        teacher = distill.build_teacher(args.teacher, args.teacher_weights, grid=grid,
                                        rope_jitter=not args.no_teacher_jitter)
    return teacher.to(device)


def ensure_standin_teacher(args):
    """`python tokenizer.py` with no arguments trains the stand-in teacher first if it is missing (and only
    if the run reads a teacher)."""
    if (args.sem_decoder == "none" or args.teacher != "standin" or args.random_weights
            or distill.is_url(args.teacher_weights) or os.path.isfile(args.teacher_weights)):
        return
    if args.bench:
        raise FileNotFoundError(f"stand-in teacher {args.teacher_weights} not found, and --bench writes nothing, "
                                f"so it trains none: train it with `python distill.py`, or bench with "
                                f"--random-weights")
    if os.path.abspath(args.teacher_weights) != os.path.abspath(distill.STANDIN_TEACHER) or args.data != "synthetic":
        raise FileNotFoundError(f"stand-in teacher {args.teacher_weights} not found: train it with "
                                f"`python distill.py --data {args.data}`")
    distill.log("no stand-in teacher yet: training it first (python distill.py)")
    distill.train_standin(distill.parse_args(["--out", distill.RUNS["teacher"]]))  # every rank takes part


def check_standin_data(args, teacher):
    """A stand-in teacher knows only the images it trained on: one from the quick start (the built-in shapes)
    distilled into a tokenizer of a photo folder would teach it shapes. Its checkpoint records its --data."""
    trained = teacher.data or args.data
    where = [d if d == "synthetic" else os.path.abspath(d) for d in (trained, args.data)]
    if where[0] != where[1]:
        raise ValueError(f"stand-in teacher {args.teacher_weights} trained on {trained}, not on --data "
                         f"{args.data}: train one on this data with `python distill.py --data {args.data} --out "
                         f"runs/teacher_mine` and pass --teacher-weights runs/teacher_mine/teacher.pt")


def build_loss(args, stage, device):
    """The stage's TokenizerLoss, its discriminator identical on every rank (DDP does this for the tokenizer)."""
    latent_terms = (dict(kl_weight=args.kl_weight, sem_weight=args.sem_weight, sem_loss=args.sem_loss)
                    if stage == 1 else dict(kl_weight=0.0))  # stage 2: pixels only
    loss = TokenizerLoss(build_perceptual(args), perceptual_weight=args.perceptual_weight,
                         gan_weight=args.gan_weight, gan_start_epoch=args.gan_start_epoch, **latent_terms)
    distill.broadcast_module(loss.to(device).discriminator)
    return loss


def discriminator_step(loss, d_opt, batches, decoded, epoch, clip):
    """The discriminator's step follows the generator's, as the authors' loop orders it: its hinge loss
    on every micro-batch (gradients averaged over micro-batches and ranks), clipped at --clip like the
    generator's, one optimizer step. Returns the last micro-batch's loss."""
    disc = loss.discriminator
    disc.requires_grad_(True)
    for x, fake in zip(batches, decoded):
        d_loss = loss.discriminator_loss(x, fake, epoch)
        (d_loss / len(batches)).backward()
    distill.allreduce_grads(disc)
    nn.utils.clip_grad_norm_(disc.parameters(), clip)
    d_opt.step()
    d_opt.zero_grad(set_to_none=True)
    disc.requires_grad_(False)  # the generator's step only reads D
    return d_loss.detach()


def grid_images(args, data, size):
    """A fixed set of images, one per class (the first 10 classes; the built-in data's val split, or the
    training folder itself), for the reconstruction grids."""
    val = data if args.data != "synthetic" else distill.build_dataset("synthetic", size, "val", 100, args.seed)
    return torch.stack([val[i][0] for i in distill.one_per_class(val)])


@torch.no_grad()
def save_reconstructions(model, images, device, path):
    """Originals above the tokenizer's reconstructions."""
    x = images.to(device)
    with distill.autocast(device):
        recon = model.reconstruct(x)
    distill.save_grid([x * 0.5 + 0.5, recon], path)


def generator_pass(net, teacher, loss_fn, x, stage, epoch, autocast=contextlib.nullcontext()):
    """One micro-batch's forward and generator loss: (total, detached terms, the net's outputs). Stage 1
    distils the teacher's patch features; stage 2 has no flow noise (tau 0: the decoder reads the clean
    posterior sample) and no teacher."""
    with torch.no_grad(), autocast:
        target = teacher(x) if teacher is not None else None
    with autocast:
        out = net(x) if stage == 1 else net(x, tau=x.new_zeros(len(x), 1, 1))
    return (*loss_fn.generator_loss(x, out, target, epoch), out)


def train(args):
    """Stage 1 (`train`: the whole tokenizer, with the teacher) or stage 2 (`finetune`: the pixel decoder
    alone, on the clean posterior sample, see stage2_model): one loop, the stage changes the lines that say so."""
    stage = 2 if args.mode == "finetune" else 1
    rank, world, device = distill.setup_distributed()
    if rank == 0 and not args.bench:
        distill.prepare_out_dir(args.out)
    if stage == 1:
        ensure_standin_teacher(args)  # before seeding: the same run whether or not it had to train one
    torch.manual_seed(args.seed * world + rank)
    random.seed(args.seed * world + rank)
    if stage == 1:
        teacher = build_stage1_teacher(args, args.image_size // args.patch_size, device)
        config = model_config(args, teacher.dim if teacher is not None else 0)
        model = RecTok(**config).to(device)
    else:
        teacher, (model, config) = None, stage2_model(args, device)
    ema = distill.make_ema(model)
    distill.enable_grad_checkpoint(model, args.grad_checkpoint)
    distill.enable_tf32(device)
    if args.compile:
        distill.compile_blocks(model, Block)
        if teacher is not None:
            distill.compile_blocks(teacher, distill.Block)
    ddp = nn.parallel.DistributedDataParallel(model) if distill.is_distributed() else model
    loss_fn = build_loss(args, stage, device)
    global_batch = args.batch_size * args.grad_accum * world
    lr = args.base_lr * global_batch / 256
    # fused AdamW on CUDA and on the CPU too (174M parameters: 0.12 s a step against 0.53 s unfused)
    opt, d_opt = (torch.optim.AdamW(distill.weight_decay_groups(net, args.weight_decay), lr=lr, betas=(0.9, 0.95),
                                    fused=True) for net in (model, loss_fn.discriminator))
    data = distill.build_dataset(args.data, config["img_size"], "train", args.num_train, args.seed,
                                 args.skip_bad_images)
    if teacher is not None and args.teacher == "standin" and not args.random_weights:
        check_standin_data(args, teacher)  # once the data is known to exist
    loader, sampler = distill.make_loader(data, args.batch_size, args.seed, rank, world, args.workers, device)
    flip_gen = torch.Generator().manual_seed(args.seed * world + rank)
    run = distill.Run(  # resumes OUT/latest.pt if there is one
        args, "tokenizer", device, len(data), global_batch,
        {"model": model, "ema": ema, "optimizer": opt, "discriminator": loss_fn.discriminator, "d_optimizer": d_opt},
        {"flip_rng": flip_gen}, match={"config": config},
        check={"tokenizer": model, "discriminator": loss_fn.discriminator})
    grids = rank == 0 and not args.bench and args.grid_every > 0
    images = grid_images(args, data, config["img_size"]) if grids else None
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    distill.log(f"RecTok stage {stage}: {trained / 1e6:.2f}M trained parameters "
                f"(teacher {args.teacher if teacher is not None else 'none'}), {len(data)} images, "
                f"{world} process(es) x batch {args.batch_size} x accum {args.grad_accum}, lr {lr:.2e}, "
                f"{run.total} steps")
    autocast = distill.autocast(device)
    loss_fn.discriminator.requires_grad_(False)  # the generator's step only reads D
    model.train()
    while run.step < run.stop:
        epoch, in_epoch = divmod(run.step, run.steps_per_epoch)
        sampler.set_position(epoch, in_epoch * args.grad_accum)
        for group in distill.micro_batches(loader, args.grad_accum):
            batches = [distill.random_flip(x.to(device, non_blocking=True), flip_gen) for x, _ in group]
            for g in opt.param_groups + d_opt.param_groups:
                g["lr"] = lr * distill.warmup_cosine(run.step / run.total, args.warmup)
            decoded, losses = [], {}  # losses: each term's mean over the micro-batches (logged, and watched)
            for i, x in enumerate(batches):  # --grad-accum micro-batches, one gradient all-reduce at the last
                with distill.sync_at_last(ddp, i == len(batches) - 1):
                    total, terms, out = generator_pass(ddp, teacher, loss_fn, x, stage, epoch, autocast)
                    (total / len(batches)).backward()
                decoded.append(out["decoded"].detach())
                for k, v in dict(terms, total=total.detach()).items():
                    losses[k] = losses.get(k, 0) + v / len(batches)
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            distill.update_ema(ema, model, args.ema)
            if loss_fn.gan_on(epoch):
                losses["disc"] = discriminator_step(loss_fn, d_opt, batches, decoded, epoch, args.clip)
            run.tick(sum(len(x) for x in batches) * world, losses["total"])
            if run.log_due():
                distill.log(f"step {run.step}/{run.total} epoch {run.epoch:.2f} "
                            + " ".join(f"{k} {v.item():.4f}" for k, v in dict(losses, grad_norm=grad_norm).items())
                            + f" lr {opt.param_groups[0]['lr']:.2e} {run.meter.report()}")
            if images is not None and run.every(args.grid_every):
                save_reconstructions(ema, images, device, os.path.join(args.out, f"recon_{run.step:07d}.png"))
            if run.checkpoint_due():
                run.save()
            if not run.bench and args.save_every and run.step % (args.save_every * run.steps_per_epoch) == 0:
                run.save(f"epoch_{run.step // run.steps_per_epoch:04d}.pt")
            if run.step >= run.stop or run.epoch_end():
                break
    def forward(n):  # --bench's activation count: the loss on n of the last micro-batch's images
        return generator_pass(model, teacher, loss_fn, x[:n], stage, epoch)[0]

    result = run.done(f"RecTok stage {stage}", forward if run.bench and len(x) > 1 else None,
                      frozen=[net for net in (teacher, loss_fn) if net is not None])
    if run.step > run.start and not run.bench:
        distill.log(f"wrote {run.latest}" + (f" and reconstruction grids in {args.out}" if images is not None else ""))
    distill.cleanup_distributed()
    return result


#################################################################################
#            Stage 2, the paper's decoder fine-tuning, on the clean latent      #
#################################################################################


def stage2_model(args, device):
    """The stage-1 EMA tokenizer without its semantic decoder, with everything but the pixel decoder
    frozen. Its config drops the semantic decoder, masking and flow: the saved checkpoint is the
    generator-stage layout. With --random-weights (a bench), an untrained one of the preset's architecture."""
    if args.random_weights:
        stage1, sd = model_config(parse_args(["train", "--preset", args.preset]), 0), None
    else:
        stage1, sd = stage1_weights(args.init)
    config = dict(stage1, sem_decoder="none", teacher_dim=0, mask_ratio=0.0)
    model = RecTok(**config)
    if sd is not None:
        sd = {k: v for k, v in sd.items() if not k.startswith("sem_decoder.")}
        distill.load_strict(model, sd, f"stage-1 checkpoint {args.init}")
    model.encoder.requires_grad_(False)
    return model.to(device), config


def stage1_weights(path):
    """(config, EMA weights) of a stage-1 tokenizer: written by `tokenizer.py train`, or the authors'
    RecTok.pth (from which they fine-tuned RecTok_decft.pth). No model is built here: that would draw
    from the run's seeded random stream and change what stage 2 trains."""
    if not distill.is_url(path) and not os.path.isfile(path):
        raise FileNotFoundError(f"stage-1 checkpoint not found: {path}. Train it first with "
                                f"`python tokenizer.py` (or pass --init)")
    return tokenizer_weights(distill.load_checkpoint(path, ("tokenizer",), "stage-1 tokenizer checkpoint"), path)


#################################################################################
#                 Reconstruction evaluation: PSNR and rFID                      #
#################################################################################


def eval_loader(args, size, rank, world):
    """Held-out images, center crop, no flip, split over ranks without padding."""
    data = distill.build_dataset(args.data, size, "val", args.num_eval, args.seed, args.skip_bad_images)
    return data, torch.utils.data.DataLoader(distill.shard(data, rank, world), batch_size=args.batch_size,
                                             num_workers=args.workers, collate_fn=distill.collate)


def psnr(recon, x):
    """Per-image PSNR (dB) of reconstructions in [0, 1] against images x in [-1, 1]."""
    mse = ((recon - (x * 0.5 + 0.5)) ** 2).mean(dim=(1, 2, 3))
    return -10 * torch.log10(mse.clamp(min=1e-10))


@torch.no_grad()
def reconstruction_pass(model, loader, device, inception):
    """Sum of per-image PSNRs and, with an Inception, pool3 features of the reconstructions."""
    psnr_sum, feats = torch.zeros((), dtype=torch.float64, device=device), []
    for x, _ in loader:
        x = x.to(device)
        with distill.autocast(device):
            recon = model.reconstruct(x).float()
        psnr_sum += psnr(recon, x).double().sum()
        if inception is not None:  # uint8 by truncation, as the released evaluation saves them
            feats.append(inception(fid.preprocess((recon * 255).to(torch.uint8)))[0].double().cpu())
    return psnr_sum, distill.gather(feats).numpy() if inception is not None else None


@torch.no_grad()
def evaluate(args):
    """PSNR (per image on [0, 1], averaged) and, with --rfid, rFID against the statistics of the same
    held-out images (computed once, cached in --ref-stats), for the raw and EMA weights. Writes
    metrics_DATA.json and grids of originals above reconstructions, eval_DATA_WEIGHTS.png, named by the
    data set (data_tag: evaluating on another one keeps the first), into --out (default: next to the
    checkpoint; runs/eval for a URL)."""
    rank, world, device = distill.setup_distributed()
    beside = "runs/eval" if distill.is_url(args.ckpt) else os.path.dirname(os.path.abspath(args.ckpt))
    results, out_dir, tag = {}, args.out or beside, data_tag(args.data)
    if rank == 0:
        distill.prepare_out_dir(out_dir)
    inception = fid.FIDInception().load(args.inception_weights).to(device) if args.rfid else None
    for weights in ("model", "ema"):
        model = load_tokenizer(args.ckpt, weights, device)
        config = model.config
        if weights == "model":  # the images and their reference statistics, once for both
            data, loader = eval_loader(args, config["img_size"], rank, world)
            ref = reference_statistics(args, inception, loader, config["img_size"], len(data), device, rank)
        psnr_sum, feats = reconstruction_pass(model, loader, device, inception)
        if world > 1:
            dist.all_reduce(psnr_sum)
        results[weights] = {"psnr": psnr_sum.item() / len(data), "num_images": len(data)}
        if inception is not None:
            results[weights]["rfid"] = fid.frechet_distance(*fid.statistics(feats), *ref)
        distill.log(f"{weights}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in results[weights].items()))
        if rank == 0:
            x = torch.stack([data[i][0] for i in distill.one_per_class(data)])
            save_reconstructions(model, x, device, os.path.join(out_dir, f"eval_{tag}_{weights}.png"))
    if rank == 0:
        path = os.path.join(out_dir, f"metrics_{tag}.json")
        distill.write_json(path, {"checkpoint": args.ckpt, "data": args.data, **results})
        distill.log(f"wrote {path}")
    distill.cleanup_distributed()
    return results


@torch.no_grad()
def reconstruct(args):
    """Your folder through the tokenizer: every image under --data (at any depth; its ADM center crop at the
    tokenizer's size) encoded and decoded, written under --out at the same relative path as a PNG, and
    psnr.csv: each image's PSNR (dB, on [0, 1] against the crop) by name, then their mean. Ranks take
    contiguous shares of the images; rank 0 writes the CSV."""
    rank, world, device = distill.setup_distributed()
    if rank == 0:
        distill.prepare_out_dir(args.out)
    model = load_tokenizer(args.ckpt, args.weights, device)
    data = distill.ImageFolder(args.data, model.img_size, args.skip_bad_images, classes=False)
    names = [os.path.splitext(data.name(i))[0] + ".png" for i in range(len(data))]
    clash = sorted(name for name, n in collections.Counter(names).items() if n > 1)
    if clash:
        raise ValueError(f"{args.data}: images that differ only in extension would write the same PNG "
                         f"({', '.join(clash[:3])}): rename them")
    mine = distill.shard(data, rank, world).indices
    loader = torch.utils.data.DataLoader(distill.Numbered(data, mine), batch_size=args.batch_size,
                                         num_workers=args.workers, collate_fn=distill.collate)
    scores = []
    for x, _, position in loader:
        x = x.to(device)
        with distill.autocast(device):
            recon = model.reconstruct(x).float()
        # B x 3 x H x W -> B x H x W x 3
        pixels = (recon * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for k, image, score in zip(position.tolist(), pixels, psnr(recon, x).tolist()):
            path = os.path.join(args.out, names[mine[k]])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            distill.save_png(image, path)
            scores.append((names[mine[k]], score))
    scores = [row for share in distill.gather_objects(scores, world) for row in share]
    mean = sum(score for _, score in scores) / max(len(scores), 1)
    if rank == 0:
        table = "image,psnr\n" + "".join(f"{name},{score:.4f}\n" for name, score in scores) + f"mean,{mean:.4f}\n"
        distill.atomic_write(os.path.join(args.out, "psnr.csv"), lambda f: f.write(table.encode()))
        distill.log(f"wrote {len(scores)} reconstructions of {args.data} to {args.out}; mean PSNR {mean:.2f} dB "
                    f"(psnr.csv)")
    distill.cleanup_distributed()
    return mean


def data_tag(data):
    """A data set's name in output file names: 'synthetic', or the folder's name and a hash of its absolute
    path, so that /imagenet/val and /mydata/val never write the same file."""
    if data == "synthetic":
        return data
    path = os.path.abspath(data)
    return f"{os.path.basename(path)}-{hashlib.sha1(path.encode()).hexdigest()[:6]}"


@torch.no_grad()
def reference_statistics(args, inception, loader, size, n, device, rank):
    """FID statistics of the evaluation images (None without --rfid): read from --ref-stats if it exists,
    else from one Inception pass over the images, written there (atomically, by rank 0)."""
    if inception is None:
        return None
    path = args.ref_stats or default_ref_stats(args, size, n)
    if os.path.isfile(path):
        return fid.load_statistics(path)
    feats = []
    for x, _ in loader:
        real = ((x.to(device).float() + 1) * 127.5).round().to(torch.uint8)  # the data's own uint8 pixels
        feats.append(inception(fid.preprocess(real))[0].double().cpu())
    mu, sigma = fid.statistics(distill.gather(feats).numpy())
    if rank == 0:
        distill.atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma))
        distill.log(f"wrote reference statistics {path}")
    return mu, sigma


def default_ref_stats(args, size, n):
    """runs/fid_stats/DATA_SIZEpx_N_KEY.npz. KEY hashes what picks the images (a folder's absolute path and
    --skip-bad-images, the built-in data's seed): two folders named val, or two seeds, never share a file.
    A folder whose files change keeps its KEY: pass a fresh --ref-stats then."""
    folder = [os.path.abspath(args.data), args.skip_bad_images]
    source = ["synthetic", args.seed] if args.data == "synthetic" else folder
    key = hashlib.sha1(json.dumps([*source, size, n]).encode()).hexdigest()[:8]
    name = f"{os.path.basename(os.path.normpath(args.data))}_{size}px_{n}_{key}.npz"
    return os.path.join(distill.RUNS["fid_stats"], name)


#################################################################################
#                 The latent cache (`main_diffusion.py`) and its reader         #
#################################################################################

CACHE_ARRAYS = ("moments", "moments_flip")


def cache_meta(args, model, config, data):
    grid = config["img_size"] // config["patch_size"]
    source = args.ckpt if distill.is_url(args.ckpt) else os.path.abspath(args.ckpt)
    return {"tokenizer": source, "fingerprint": distill.weights_fingerprint(model),
            "config": config, "data": args.data if args.data == "synthetic" else os.path.abspath(args.data),
            "num_images": len(data), "num_classes": data.num_classes,
            "tokens": grid * grid, "channels": config["channels"], "grid": grid,
            "image_size": config["img_size"], "dtype": "float16", "shard_size": args.shard_size,
            "num_shards": math.ceil(len(data) / args.shard_size), "split": "train", "seed": args.seed,
            "crop": f"ADM center crop {config['img_size']} px, no flip (the flip is stored beside it)"}


#: what must match for an encode to resume into an existing cache: the same tokenizer, the same images
RESUME_KEYS = ("fingerprint", "data", "split", "seed", "num_images", "crop", "tokens", "channels", "shard_size",
               "files")


def write_file_list(root, files):
    """Where each latent comes from: files.txt beside meta.json, one line per index: the class, a tab, the
    image's path under the data folder."""
    lines = "".join(f"{c}\t{name}\n" for name, c in zip(files[1], files[2]))
    distill.atomic_write(os.path.join(root, "files.txt"), lambda f: f.write(lines.encode()))


def shard_range(meta, k):
    """The image indices [lo, hi) of shard k."""
    return k * meta["shard_size"], min(meta["num_images"], (k + 1) * meta["shard_size"])


def shard_path(root, name, k):
    return os.path.join(root, f"{name}.{k:05d}.npy")


def open_shard(root, meta, k, mode):
    """The memory-mapped arrays of shard k: moments of each image and of its flip (n, L, 2C) float16,
    labels (n,) int64, and a done flag per image that makes encoding resumable. Each shard is written by one
    process only (its own files, no shared pages), so ranks on several nodes of a network file system
    never write back over each other. Mode "w+" creates the files (atomically: a kill leaves none half
    made)."""
    lo, hi = shard_range(meta, k)
    layout = {name: (np.float16, (hi - lo, meta["tokens"], 2 * meta["channels"])) for name in CACHE_ARRAYS}
    layout.update(labels=(np.int64, (hi - lo,)), done=(np.bool_, (hi - lo,)))
    if mode == "w+":  # "done" is made last: a shard that has it has all its files
        if os.path.isfile(shard_path(root, "done", k)) and not all(
                os.path.isfile(shard_path(root, name, k)) for name in layout):
            raise RuntimeError(f"{root}: shard {k} has lost files; encode into a fresh --out")
        for name, (dtype, shape) in layout.items():
            path = shard_path(root, name, k)
            if not os.path.isfile(path):
                tmp = f"{path}.tmp{os.getpid()}"
                np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape).flush()
                reserve(tmp, path)
                os.replace(tmp, path)
        mode = "r+"
    return {name: np.load(shard_path(root, name, k), mmap_mode=mode) for name in layout}


def map_array(path):
    """A .npy file mapped read-only, holding no open file: numpy's memmap keeps a file descriptor per array,
    and ImageNet's cache (313 shards of 4 arrays) passed the common limit of 1,024; a private mapping made
    by torch keeps none. Pages are read when used, as with np.load(mmap_mode="r")."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(version, np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(f)
        offset = f.tell()  # the header is padded to a multiple of 64 bytes: a whole number of elements
    empty = torch.from_numpy(np.empty(0, dtype))
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=os.path.getsize(path))
    return empty.set_(storage, offset // empty.element_size(), shape)


def reserve(tmp, path):
    """Allocate a new shard file's blocks now: a memory-mapped write into a sparse file on a full disk
    kills the process with SIGBUS ("Bus error") mid-encode; here it fails at once, with a message."""
    fd = os.open(tmp, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.path.getsize(tmp))
    except OSError as e:
        os.remove(tmp)
        raise distill.no_space(path) if e.errno == errno.ENOSPC else e from None
    finally:
        os.close(fd)


@torch.no_grad()
def encode(args):
    """Encode a data set into the latent cache. The index space is cut into shards of --shard-size images;
    ranks take contiguous runs of shards and each writes only its own shard files. Each batch's rows are
    flushed before its `done` flags, so a killed run resumes where it stopped (on any number of processes)
    and never writes an index twice. stats.npz is computed at the end from the stored means in float64."""
    rank, world, device = distill.setup_distributed()
    model = load_tokenizer(args.ckpt, "ema", device)
    config = model.config
    data = distill.build_dataset(args.data, config["img_size"], "train", args.num_train, args.seed,
                                 args.skip_bad_images)
    meta = cache_meta(args, model, config, data)
    if rank == 0:
        distill.prepare_out_dir(args.out)
    meta_path = os.path.join(args.out, "meta.json")
    if rank == 0:
        files = distill.image_files(data)  # a resume must find the same files, not just as many
        meta["files"] = files and distill.files_fingerprint(files[0], files[1])
        if os.path.isfile(meta_path):
            check_meta(args.out, {k: meta[k] for k in RESUME_KEYS},
                       fix=f"It holds other latents than this command would write: encode into a fresh "
                           f"--out (or delete {args.out})")
        else:
            if files:
                write_file_list(args.out, files)
            distill.write_json(meta_path, meta)
    distill.barrier()
    mine = range(rank * meta["num_shards"] // world, (rank + 1) * meta["num_shards"] // world)
    # One shard open at a time (its 4 arrays hold 4 open files): the images to do, then the batches in order
    todo = [(k, j) for k in mine for j in np.flatnonzero(~open_shard(args.out, meta, k, "w+")["done"]).tolist()]
    distill.log(f"encoding {len(data)} images in {meta['num_shards']} shards into {args.out} with {world} "
                f"process(es); rank 0: {len(todo)} images to do")
    index = [shard_range(meta, k)[0] + j for k, j in todo]
    loader = torch.utils.data.DataLoader(distill.Numbered(data, index), batch_size=args.batch_size,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         collate_fn=distill.collate)
    meter, start, preemption = distill.Throughput(device), 0, distill.Preemption()
    for x, y, position in loader:
        batch = [todo[p] for p in position.tolist()]
        start = position[-1].item() + 1
        x = x.to(device, non_blocking=True)
        with distill.autocast(device):
            both = model.moments(torch.cat([x, x.flip(-1)])).float()
        values = {"moments": both[:len(y)].cpu().numpy().astype(np.float16),
                  "moments_flip": both[len(y):].cpu().numpy().astype(np.float16), "labels": y.numpy()}
        for k in sorted({k for k, _ in batch}):  # a batch may straddle shards; one is open at a time
            shard = open_shard(args.out, meta, k, "r+")
            rows = [r for r, (kk, _) in enumerate(batch) if kk == k]
            where = [batch[r][1] for r in rows]
            for name, v in values.items():
                shard[name][where] = v[rows]
                shard[name].flush()
            shard["done"][where] = True  # only after the rows are on disk
            shard["done"].flush()
        meter.add(len(y) * world)
        if start % (args.batch_size * args.log_every) < len(y) or start == len(todo):
            distill.log(f"encoded {start}/{len(todo)} on rank 0 {meter.report()}")
        if preemption.stopped(f"{start} of rank 0's {len(todo)} images"):
            return None
    skipped = mark_skipped(args.out, meta, mine) if args.skip_bad_images else 0
    distill.wait_for_all()  # a resumed encode leaves the ranks unequal shares
    shards = ((map_array(shard_path(args.out, "moments", k)), np.load(shard_path(args.out, "labels", k)))
              for k in mine)  # one shard at a time
    stats = cache_statistics(shards, config["channels"], device)
    if skipped:
        distill.log(f"rank 0 skipped {skipped} images that did not decode (label -1 in the cache: never read)")
    if rank == 0:
        missing = [k for k in range(meta["num_shards"]) if not open_shard(args.out, meta, k, "r")["done"].all()]
        if missing:
            raise RuntimeError(f"{args.out}: shards {missing} were not fully encoded; run encode again to finish")
        distill.atomic_write(os.path.join(args.out, "stats.npz"),
                             lambda f: np.savez(f, mean=stats[0], std=stats[1]))
        size = sum(os.path.getsize(shard_path(args.out, n, k)) for n in CACHE_ARRAYS + ("labels",)
                   for k in range(meta["num_shards"]))
        distill.log(f"wrote {args.out}: {len(data)} images, {size / len(data) / 1024:.1f} KiB per image, "
                    f"stats.npz (latent mean {stats[0].mean():.4f}, std {stats[1].mean():.4f})")
    distill.cleanup_distributed()


def mark_skipped(root, meta, shards):
    """After a pass over every image (--skip-bad-images), an image still not done is one that did not decode:
    it is marked done with label -1, which the cache's reader and statistics leave out. Returns their count."""
    count = 0
    for k in shards:
        shard = open_shard(root, meta, k, "r+")
        left = np.flatnonzero(~shard["done"])
        for name, value in (("labels", -1), ("done", True)):  # done last, as in encode
            shard[name][left] = value
            shard[name].flush()
        count += len(left)
    return count


def cache_statistics(shards, channels, device, chunk=4096):
    """Per-channel mean and std of the posterior MEANS over the data set (`main_diffusion.py`), from float64 sums
    over this rank's shards ((moments, labels) pairs; label -1 marks a skipped image), all-reduced over ranks
    (no E[x^2] - E[x]^2 cancellation in fp32)."""
    sums = torch.zeros(3, channels, dtype=torch.float64, device=device)
    for moments, labels in shards:
        for s in range(0, len(moments), chunk):
            kept = torch.from_numpy(labels[s:s + chunk] >= 0)
            mean = torch.from_numpy(np.asarray(moments[s:s + chunk, :, :channels])).double()[kept]
            mean = mean.reshape(-1, channels).to(device)  # n x L x C -> (n L) x C
            sums += torch.stack([torch.full_like(mean[0], mean.shape[0]), mean.sum(0), (mean ** 2).sum(0)])
    if distill.is_distributed():
        dist.all_reduce(sums)
    count, total, square = sums
    mu = total / count
    return mu.cpu().numpy(), (square / count - mu ** 2).clamp(min=0).sqrt().cpu().numpy()


def check_meta(root, expect, fix="Re-encode with the matching tokenizer, or point to the right cache"):
    """Stop with a clear message (the differences, then `fix`) when a cache does not come from what the
    caller expects."""
    path = os.path.join(root, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no latent cache at {root} (meta.json missing): write one with "
                                f"`python tokenizer.py encode --ckpt TOKENIZER --out {root}`")
    with open(path) as f:
        meta = json.load(f)
    wrong = {k: (meta.get(k), v) for k, v in expect.items() if meta.get(k) != v}
    if wrong:
        detail = "; ".join(f"{k}: cache has {a!r}, expected {b!r}" for k, (a, b) in wrong.items())
        raise ValueError(f"latent cache {root} does not match: {detail}. {fix}")
    return meta


class LatentCache(torch.utils.data.Dataset):
    """Reader of a latent cache (for dit.py and probe.py): item i is (moments (L, 2C) float32, label), the
    moments of the image or of its flip, chosen per (seed, epoch, i) so that a resumed run sees the same
    choice. `expect` is checked against meta.json."""

    def __init__(self, root, expect=None, flip=True, seed=0):
        self.meta = check_meta(root, expect or {})
        if not os.path.isfile(os.path.join(root, "stats.npz")):
            raise FileNotFoundError(f"{root} has no stats.npz: its encoding did not finish; run encode again")
        shards = range(self.meta["num_shards"])
        self.moments = [map_array(shard_path(root, "moments", k)) for k in shards]  # no open file per shard
        self.flipped = [map_array(shard_path(root, "moments_flip", k)) for k in shards]
        self.labels = np.concatenate([np.load(shard_path(root, "labels", k)) for k in shards])
        self.index = np.flatnonzero(self.labels >= 0)  # label -1: an image skipped when encoded
        stats = np.load(os.path.join(root, "stats.npz"))
        self.mu, self.sigma = torch.from_numpy(stats["mean"]).float(), torch.from_numpy(stats["std"]).float()
        self.flip, self.seed, self.epoch = flip, seed, 0
        self.num_classes = self.meta["num_classes"]

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        flip = self.flip and np.random.default_rng([self.seed, self.epoch, i]).random() < 0.5
        i = self.index[i]
        k, j = divmod(int(i), self.meta["shard_size"])
        return (self.flipped if flip else self.moments)[k][j].float(), int(self.labels[i])


def sample_latent(moments, mu, sigma, grid, generator=None):
    """The generator's training input (`main_diffusion.py`): a posterior SAMPLE, normalised per channel,
    (B, L, 2C) -> (B, C, h, w)."""
    post = Posterior(moments)
    eps = torch.randn(post.mean.shape, generator=generator, device=moments.device)
    z = (post.sample(eps) - mu.to(moments.device)) / sigma.to(moments.device)
    return z.transpose(1, 2).reshape(moments.shape[0], -1, grid, grid)  # B x L x C -> B x C x h x w


MODES = ("train", "finetune", "evaluate", "encode", "reconstruct")


def add_data_flags(p, mode):
    """Flags every mode reads: the images, the run folder, batches, workers."""
    out = {"train": distill.RUNS["tokenizer"], "finetune": distill.RUNS["tokenizer_ft"],
           "encode": distill.RUNS["latents"], "evaluate": "the checkpoint's folder",
           "reconstruct": distill.RUNS["reconstruct"]}[mode]
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="sets the defaults below" + (" (stage 1's and stage 2's)" if mode == "finetune" else ""))
    p.add_argument("--data", default=None if mode == "reconstruct" else "synthetic",
                   help="'synthetic' (built-in) or an ImageNet-style folder; reconstruct: any image folder")
    p.add_argument("--skip-bad-images", action="store_true", help="leave out (and count) unreadable files")
    p.add_argument("--out", default=None if mode == "evaluate" else out, help=f"run folder ({out})" + (
        "; a folder with latest.pt resumes" if mode in ("train", "finetune") else ""))
    p.add_argument("--batch-size", type=distill.positive_int, help="per process")
    if mode in ("train", "finetune", "encode"):
        p.add_argument("--num-train", type=distill.positive_int, help="use this many training images")


# The settings a flag acts under (distill.only_with): the words --help and the error print, and the test.
TRANSFORMER = "--sem-decoder transformer (the MLP is 4 C wide)", lambda a: a.sem_decoder == "transformer"
SEMANTIC = "--sem-decoder transformer or mlp (none has no teacher)", lambda a: a.sem_decoder != "none"
MASKING = "--mask-ratio above 0 (RAD's masking)", lambda a: a.mask_ratio > 0
FLOW = "--gamma above 0 (the forward flow)", lambda a: a.gamma > 0
GAN = "--gan-weight above 0", lambda a: a.gan_weight > 0
PERCEPTUAL = "--perceptual-weight above 0", lambda a: a.perceptual_weight > 0
BENCH = "--bench N (training needs the real nets)", lambda a: a.bench > 0
RFID = "--rfid", lambda a: a.rfid


def add_model_flags(p):
    """Stage 1 only: stage 2 and the others read the architecture from their checkpoint."""
    g = p.add_argument_group("model (`models/rectok.py`) and teacher (`utils/foundation_models.py`)")
    g.add_argument("--image-size", type=distill.positive_int)
    g.add_argument("--patch-size", type=distill.positive_int)
    g.add_argument("--channels", type=distill.positive_int, help="latent channels C")
    g.add_argument("--encoder-size", choices=sorted(SIZES))
    g.add_argument("--decoder-size", choices=sorted(SIZES))
    only(g.add_argument("--sem-size", choices=sorted(SIZES)), *TRANSFORMER)
    g.add_argument("--sem-decoder", default="transformer", choices=["transformer", "mlp", "none"],
                   help="'none' trains without the semantic loss (no FSD, no RAD); 'mlp' is the authors' "
                        "per-token MLP ablation (no RAD: needs --mask-ratio 0)")
    g.add_argument("--mask-ratio", type=float, default=0.4, help="0 turns MAE masking (RAD) off")
    only(g.add_argument("--mask-ratio-min", type=float, default=-0.1), *MASKING)
    only(g.add_argument("--noise-schedule", default="shift", choices=["shift", "uniform", "lognorm"]),
         *FLOW)
    g.add_argument("--gamma", type=distill.non_negative, default=1.0, help="flow noise scale; 0 turns the flow off")
    only(g.add_argument("--teacher", help="'standin' or an official one, e.g. dinov3_vitl16"), *SEMANTIC)
    only(g.add_argument("--teacher-weights", default=None, help=f"checkpoint path or URL (default: "
                        f"{distill.STANDIN_TEACHER} for the stand-in)"), *SEMANTIC)
    only(g.add_argument("--no-teacher-jitter", action="store_true",
                        help="run DINOv3 without the training-mode RoPE rescale of the release"), *SEMANTIC)
    g.add_argument("--kl-weight", type=distill.non_negative, default=1e-6)
    only(g.add_argument("--sem-weight", type=distill.non_negative, default=1.0), *SEMANTIC)
    only(g.add_argument("--sem-loss", default="cosine", choices=["cosine", "l2", "l1"]), *SEMANTIC)


def add_training_flags(p):
    """Both training stages: losses on pixels, optimisation, run control."""
    g = p.add_argument_group("losses (`utils/losses.py`) and optimisation (`main_reconstruction.py`)")
    g.add_argument("--perceptual-weight", type=distill.non_negative)
    g.add_argument("--gan-weight", type=distill.non_negative, default=0.1)
    only(g.add_argument("--gan-start-epoch", type=distill.non_negative_int), *GAN)
    for flag, url in (("--vgg16-weights", VGG16_URL), ("--lpips-weights", LPIPS_URL),
                      ("--convnext-weights", CONVNEXT_S_URL)):
        only(g.add_argument(flag, default=url), *PERCEPTUAL)
    g.add_argument("--epochs", type=distill.positive_int)
    g.add_argument("--grad-accum", type=distill.positive_int, help="micro-batches per optimizer step: the "
                   "global batch is batch_size x grad_accum x processes")
    g.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each block's activations in backward: less memory, about a third more compute")
    g.add_argument("--base-lr", type=distill.positive, help="lr = base_lr * global_batch / 256")
    g.add_argument("--warmup", type=distill.fraction, default=0.25, help="fraction of training")
    g.add_argument("--weight-decay", type=distill.non_negative, default=1e-4)
    g.add_argument("--clip", type=distill.positive, default=3.0, help="gradient-norm clip, tokenizer and discriminator")
    g.add_argument("--ema", type=distill.fraction, help="EMA decay (paper 0.999)")
    distill.add_run_flags(p, ckpt_every=500, save_every=50, save_unit="epochs")
    p.add_argument("--grid-every", type=distill.non_negative_int, default=500,
                   help="reconstruction grid PNG every N steps (0: off)")
    only(p.add_argument("--random-weights", action="store_true", help="untrained teacher and perceptual "
                        "nets (no downloads, no stand-in training); in finetune also an untrained stage-1 "
                        "tokenizer (no --init)"), *BENCH)


def build_parser(mode, add_help=True):
    """The command line of one mode, with only the flags that mode reads (any other fails)."""
    p = argparse.ArgumentParser(prog=f"tokenizer.py {mode}", description=__doc__,
                                formatter_class=distill.HelpFormatter, add_help=add_help)
    add_data_flags(p, mode)
    if mode == "train":
        add_model_flags(p)
    if mode in ("train", "finetune"):
        add_training_flags(p)
        if mode == "finetune":
            p.add_argument("--init", default=os.path.join(distill.RUNS["tokenizer"], "latest.pt"),
                           help="the stage-1 checkpoint (ours, or the authors' RecTok.pth)")
        return p
    p.add_argument("--ckpt", default=os.path.join(distill.RUNS["tokenizer_ft"], "latest.pt"), help="the tokenizer")
    if mode == "evaluate":
        p.add_argument("--num-eval", type=distill.positive_int, default=1000, help="held-out images")
        p.add_argument("--rfid", action="store_true", help="also rFID (needs the FID Inception)")
        only(p.add_argument("--inception-weights", help="pt_inception-2015-12-05 path (default: URL)"), *RFID)
        only(p.add_argument("--ref-stats", help=f"reference statistics cache (.npz); None: "
                            f"{distill.RUNS['fid_stats']}/DATA_SIZEpx_N_KEY.npz"), *RFID)
    elif mode == "encode":
        p.add_argument("--shard-size", type=distill.positive_int, default=4096,
                       help="images per latent-cache shard file")
    else:
        p.add_argument("--weights", default="ema", choices=["ema", "model"], help="the EMA or the raw weights")
    distill.add_run_flags(p, train=False)
    return p


def parse_args(argv=None):
    """`tokenizer.py [train | finetune | evaluate | encode | reconstruct] [flags]`; no mode means train."""
    mode, argv = distill.split_mode(argv, MODES)
    stage2 = (lambda first: FINETUNE[first.preset]) if mode == "finetune" else (lambda first: {})
    p, args = distill.parse_with_preset(lambda add_help: build_parser(mode, add_help),
                                        lambda first: dict(PRESETS[first.preset], **stage2(first)), argv)
    args.mode = mode
    if mode == "reconstruct" and args.data is None:
        p.error("--data DIR: reconstruct reads a folder of your images")
    if mode == "evaluate" and args.rfid and args.num_eval < 2:
        p.error(f"--num-eval {args.num_eval}: rFID needs at least 2 images (the standard is 50,000)")
    if mode == "train":
        try:
            check_config(args.image_size, args.patch_size, args.noise_schedule, args.mask_ratio, args.mask_ratio_min,
                         args.sem_decoder)
        except ValueError as e:
            p.error(str(e))
    if mode == "train" and args.teacher_weights is None and args.teacher == "standin":
        args.teacher_weights = distill.STANDIN_TEACHER
    return args


@distill.stage
def main(argv=None):
    args = parse_args(argv)
    return {"train": train, "finetune": train, "evaluate": evaluate, "encode": encode,
            "reconstruct": reconstruct}[args.mode](args)


if __name__ == "__main__":
    main()
