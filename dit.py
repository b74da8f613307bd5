"""DiT^DH: the generator trained on RecTok's latents by flow matching (`models/DDT.py`).

A DiT trunk (adaLN-Zero blocks over the latent grid, conditioned on time and class) hands a per-token
condition to a wide, shallow head (DDT-style blocks conditioned token-wise), which predicts the velocity
x1 - x0 of the linear path x_t = t*x1 + (1-t)*x0. Time runs the generator's way, as in the released code:
t = 0 is noise, t = 1 is data (the tokenizer's tau runs the other way, see tokenizer.forward_flow); the
training time is t = 1 - shift(u, s) with s = sqrt(h*w*C/4096), so that training spends its effort near
the noise end. The Euler sampler walks the same shifted grid, with classifier-free
guidance on all channels or autoguidance by a small model; sample.py uses it too.

Run:
    python dit.py                                        # tiny preset on runs/latents (built-in data)
    torchrun --nproc_per_node=8 dit.py --preset paper --model XL --latents /latents/rectok \\
        --tokenizer FT/latest.pt --out runs/dit_xl
    python dit.py --preset paper --bench 5 --batch-size 2 --random-latents   # XL timed, no cache, no writes

Reads a latent cache written by `tokenizer.py encode` (checked against meta.json) and writes OUT/latest.pt
(resumable: model, EMA, optimizer, step, RNG), OUT/step_NNNNNNN.pt milestones and OUT/preview_STEP.png (EMA
samples decoded by --tokenizer). A checkpoint is {"kind": "generator", "config", "model", "ema",
"optimizer", "step", "epoch", "global_batch", "source", "args", "rng", "latents"}; sample.py rebuilds the
model from "config" and "ema".
"""
import argparse
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import distill
import tokenizer
from distill import only_with as only

#################################################################################
#                        Embeddings and position codes                          #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Gaussian-Fourier features of t with FIXED random frequencies W ~ N(0, 1) (256 of them):
    [sin(2 pi t W), cos(2 pi t W)] -> Linear -> SiLU -> Linear (`models/DDT.py`)."""

    def __init__(self, width, num_freqs=256):
        super().__init__()
        self.W = nn.Parameter(torch.randn(num_freqs), requires_grad=False)
        self.mlp = nn.Sequential(nn.Linear(2 * num_freqs, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        angles = 2 * math.pi * t[:, None].float() * self.W[None]
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))


class LabelEmbedder(nn.Module):
    """A table of num_classes + 1 rows: the last is the null class, which classifier-free guidance needs;
    in training a label becomes null with probability `dropout` (`models/DDT.py`), or where `drop` says
    (DiT's force_drop_ids: the trainer draws it with the step's other random numbers)."""

    def __init__(self, num_classes, width, dropout):
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.embedding_table = nn.Embedding(num_classes + 1, width)

    def forward(self, y, drop=None):
        if self.training and self.dropout > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout if drop is None else drop
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


def sincos_pos_embed(width, grid):
    """MAE's fixed 2D sin-cos table (L, width): the first half of the channels codes the column, the second
    the row, each [sin | cos] with omega_k = 1/10000^(k/(width/4)) at integer positions."""
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width / 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def code(pos):
        out = pos.reshape(-1, 1) * omega  # grid x grid -> (grid grid) x 1, times omega: L x width/4
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([code(cols), code(rows)], dim=1).float()


def eva_rope(grid, head_dim, theta=10000.0):
    """EVA-style 2D RoPE (cos, sin), each (grid*grid, head_dim): per axis head_dim/2 channels with
    frequencies 1/theta^(2j/(head_dim/2)), each repeated for an adjacent pair; rows in the first half of
    the head dim, columns in the second; integer positions (`models/DDT.py`)."""
    dim = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    axis = torch.arange(grid, dtype=torch.float32)[:, None] * freqs
    axis = axis.repeat_interleave(2, dim=-1)  # (grid, dim), pairs share an angle
    angles = torch.cat([axis[:, None, :].expand(grid, grid, dim), axis[None, :, :].expand(grid, grid, dim)],
                       dim=-1).reshape(grid * grid, head_dim)  # grid x grid x head_dim -> (grid grid) x head_dim
    return angles.cos(), angles.sin()


def rope(x, cos, sin):
    return x * cos + distill.rotate_adjacent(x) * sin


#################################################################################
#                                DiT^DH blocks                                  #
#################################################################################


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (eps 1e-6), cast back, then scaled."""

    def __init__(self, width, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def modulate(x, bias, scale):
    """adaLN: x * (1 + scale) + bias, the condition's per-channel affine map."""
    return x * (1 + scale) + bias


class Block(nn.Module):
    """adaLN-Zero block: bias/scale/gate for attention and MLP from Linear(SiLU(c)); c is (B, D) in the
    trunk and per token (B, L, D) in the head."""

    def __init__(self, width, heads):
        super().__init__()
        self.norm1 = RMSNorm(width)
        self.attn = distill.Attention(width, heads)
        self.norm2 = RMSNorm(width)
        self.mlp = distill.swiglu(width)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c, cos, sin):
        if c.dim() == 2:
            c = c[:, None]
        bias1, scale1, gate1, bias2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), bias1, scale1), lambda t: rope(t, cos, sin))
        return x + gate2 * self.mlp(modulate(self.norm2(x), bias2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, width, channels):
        super().__init__()
        self.norm_final = RMSNorm(width)
        self.linear = nn.Linear(width, channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, c):
        bias, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), bias, scale))


class PatchEmbed(nn.Module):
    def __init__(self, channels, width):
        super().__init__()
        self.proj = nn.Conv2d(channels, width, 1)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # B x C x h x w -> B x L x D


#: trunk (width, depth, heads), head (width, depth, heads) (`models/DDT.py`)
SIZES = {
    "S": ((384, 12, 6), (2048, 2, 16)),
    "B": ((768, 12, 12), (2048, 2, 16)),
    "L": ((1024, 24, 16), (2048, 2, 16)),
    "XL": ((1152, 28, 16), (2048, 2, 16)),
    "tiny": ((128, 4, 4), (128, 1, 4)),  # ours, for the CPU demo
}


class DiTDH(nn.Module):
    """DiT^DH (`models/DDT.py`). forward(x (B, C, h, w) noisy normalised latent, t (B,) in [0, 1] with 1 = data,
    y (B,) labels, num_classes = null) -> velocity (B, C, h, w)."""

    def __init__(self, channels=128, grid=16, trunk=(1152, 28, 16), head=(2048, 2, 16), num_classes=1000,
                 label_dropout=0.1):
        super().__init__()
        (dt, nt, ht), (dh, nh, hh) = trunk, head
        self.channels, self.grid, self.num_classes, self.num_trunk = channels, grid, num_classes, nt
        self.s_embedder = PatchEmbed(channels, dt)
        self.x_embedder = PatchEmbed(channels, dh)
        self.pos_embed = nn.Parameter(sincos_pos_embed(dt, grid)[None], requires_grad=False)
        self.t_embedder = TimestepEmbedder(dt)
        self.y_embedder = LabelEmbedder(num_classes, dt, label_dropout)
        self.s_projector = nn.Linear(dt, dh)
        self.blocks = nn.ModuleList([Block(dt, ht) for _ in range(nt)] + [Block(dh, hh) for _ in range(nh)])
        self.final_layer = FinalLayer(dh, channels)
        self.grad_checkpoint = False  # distill.enable_grad_checkpoint
        for name, (h, width) in (("enc_feat_rope", (ht, dt)), ("dec_feat_rope", (hh, dh))):
            cos, sin = eva_rope(grid, width // h)
            self.register_module(name, nn.Module())
            getattr(self, name).register_buffer("freqs_cos", cos)
            getattr(self, name).register_buffer("freqs_sin", sin)
        self.init_weights()

    def init_weights(self):
        """Xavier-uniform patch embeddings, N(0, 0.02) label table and time MLP, zero adaLN outputs and final
        linear (adaLN-Zero), PyTorch's default for the other Linear layers (`models/DDT.py`)."""
        for emb in (self.s_embedder, self.x_embedder):
            nn.init.xavier_uniform_(emb.proj.weight.view(emb.proj.weight.shape[0], -1))
            nn.init.zeros_(emb.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for m in [b.adaLN_modulation[1] for b in self.blocks] + [self.final_layer.adaLN_modulation[1],
                                                                 self.final_layer.linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, t, y, drop=None):
        """`drop`: which labels to drop in training (LabelEmbedder), None to draw them here."""
        B, ckpt = x.shape[0], self.grad_checkpoint and self.training
        t_emb = self.t_embedder(t)
        c = F.silu(t_emb + self.y_embedder(y, drop))
        trunk = self.s_embedder(x) + self.pos_embed
        rope_t = (self.enc_feat_rope.freqs_cos, self.enc_feat_rope.freqs_sin)
        trunk = distill.run_blocks(self.blocks[:self.num_trunk], trunk, c, *rope_t, checkpoint=ckpt)
        cond = self.s_projector(F.silu(t_emb[:, None] + trunk))  # the hand-off: a per-token condition
        h = self.x_embedder(x)  # the head re-reads x, with no position embedding
        rope_h = (self.dec_feat_rope.freqs_cos, self.dec_feat_rope.freqs_sin)
        h = distill.run_blocks(self.blocks[self.num_trunk:], h, cond, *rope_h, checkpoint=ckpt)
        out = self.final_layer(h, cond)
        # unpatchify (patch 1): B x L x C -> B x C x h x w
        return out.transpose(1, 2).reshape(B, self.channels, self.grid, self.grid)


#################################################################################
#                 Flow matching and the Euler sampler (`models/DDT.py`)        #
#################################################################################


def train_time(u, s):
    """t = 1 - shift(u, s): training time toward the noise end. As released, the shift applies only when
    s > 1 (below that t = u)."""
    return 1 - tokenizer.shift(u, s) if s > 1 else u


def flow_matching_loss(model, x1, y, s, x0=None, u=None, drop=None):
    """Linear path x_t = t*x1 + (1-t)*x0, velocity target x1 - x0, plain MSE per sample (`models/DDT.py`).
    Random draws (noise x0, time u, label drop) are made here unless given."""
    x0 = torch.randn_like(x1) if x0 is None else x0
    u = torch.rand(x1.shape[0], device=x1.device) if u is None else u
    t = train_time(u, s)
    tt = t.view(-1, 1, 1, 1)
    pred = model(tt * x1 + (1 - tt) * x0, t, y, drop)
    return ((pred.float() - (x1 - x0)) ** 2).mean(dim=(1, 2, 3))


def euler_grid(num_points, s):
    """N grid points = N-1 Euler steps: sigma = shift(t, s) on linspace(0, 1, N) in float32; for s > 1 the
    grid is flipped, g_i = 1 - sigma(1 - i/(N-1)), dense near t = 0 (noise)."""
    sigma = tokenizer.shift(torch.linspace(0, 1, num_points), s)
    return (sigma[-1] - sigma).flip(0) if s > 1 else sigma


def guided_velocity(model, x, t, y, cfg=1.0, interval=(0.0, 1.0), guide=None):
    """Inside the (inclusive) interval: classifier-free guidance v_u + w (v_c - v_u) on ALL channels, or
    autoguidance v_g + w (v_main - v_g) with a weaker model on the same labels (`models/DDT.py`
    forward_with_cfg, forward_with_autoguidance); outside it, and at w = 1, the model alone. `t` is a
    number, so that the interval test reads nothing back from the device."""
    tb = torch.full((x.shape[0],), t, device=x.device)
    if cfg == 1.0 or not (interval[0] <= t <= interval[1]):
        return model(x, tb, y)
    if guide is not None:
        v, v_g = model(x, tb, y), guide(x, tb, y)
        return v_g + cfg * (v - v_g)
    null = torch.full_like(y, model.num_classes)
    v_c, v_u = model(torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([y, null])).chunk(2)
    return v_u + cfg * (v_c - v_u)


@torch.no_grad()
def sample(model, z0, y, num_points=150, s=None, cfg=1.0, interval=(0.0, 1.0), guide=None, trajectory=False):
    """Euler ODE from t = 0 (noise z0) to 1: x <- x + (g_{i+1} - g_i) v(x, g_i). The last state is returned
    with no extra denoising step."""
    s = tokenizer.latent_shift(model.grid, model.channels) if s is None else s
    grid = euler_grid(num_points, s)
    times, grid = grid.tolist(), grid.to(z0.device)  # the same float32 values, on the host and the device
    x, states = z0, [z0]
    for i in range(num_points - 1):
        v = guided_velocity(model, x, times[i], y, cfg, interval, guide)
        x = x + (grid[i + 1] - grid[i]) * v.to(x.dtype)
        if trajectory:  # else only the current state is held (150 of them are a GB at batch 50, C = 128)
            states.append(x)
    return torch.stack(states) if trajectory else x


@torch.no_grad()
def generate(model, tok, labels, num_points=150, cfg=1.0, interval=(0.0, 1.0), guide=None, noise=None,
             mu=None, sigma=None):
    """Class labels (B,) -> images (B, 3, H, W) in [0, 1]: the Euler sampler from `noise` (default fresh
    N(0, I)), the latent de-normalised with the statistics of the cache the generator trained on (`mu`,
    `sigma`; by default those it recorded, which the authors' generators lack) and decoded by `tok`."""
    if mu is None and model.latents is None:
        raise ValueError("this generator (the authors') records no latent statistics: pass mu and sigma, the "
                         "'mean' and 'std' of the stats.npz of a cache encoded with its tokenizer")
    mu = model.latents["mu"] if mu is None else torch.as_tensor(mu)
    sigma = model.latents["sigma"] if sigma is None else torch.as_tensor(sigma)
    device = model.pos_embed.device
    labels = torch.as_tensor(labels, device=device)
    shape = (len(labels), model.channels, model.grid, model.grid)
    z0 = torch.randn(shape, device=device) if noise is None else noise.to(device)
    latents = sample(model, z0, labels, num_points, cfg=cfg, interval=interval, guide=guide)
    if not torch.isfinite(latents).all():
        raise FloatingPointError("the generator made nan or inf latents: it is broken (diverged?); sample from "
                                 "a checkpoint that trained with finite losses")
    return tok.detokenize(latents.float(), mu.to(device), sigma.to(device))


#################################################################################
#                     Training on the latent cache (`main_diffusion.py`)       #
#################################################################################

PRESETS = {
    # The released recipe: DiT^DH-XL, global batch 1024, lr 2e-4 held 40 epochs then linear to 2e-5 at
    # epoch 800, EMA 0.9995. The schedule's end is fixed: the released 80-epoch model is the first 80 epochs
    # of it (--epochs 80). (The guide model for autoguidance: --model S --epochs 30.) 1024 = 8 GPUs x 64 x
    # 2 micro-batches: 128 per GPU at once keeps about 76 GiB of activations, past an 80 GB card (the
    # authors ran 64 per GPU on 16 GPUs; the README's memory table).
    "paper": dict(model="XL", epochs=800, batch_size=64, grad_accum=2, lr=2e-4, hold_epochs=40, final_lr=2e-5,
                  decay_end_epoch=800, ema=0.9995, latents=None),
    # Minutes on a 2-core CPU on the built-in data's cache: at this size the step is arithmetic, so a
    # head as narrow as the trunk and batch 32 buy many more steps in the same time, which the samples
    # need more than width (the README's "generation half" has the measurements).
    "tiny": dict(model="tiny", epochs=20, batch_size=32, grad_accum=1, lr=1e-3, hold_epochs=5, final_lr=1e-4,
                 decay_end_epoch=20, ema=0.99, latents=distill.RUNS["latents"]),
}


def hold_then_linear(epoch, args):
    """lr held for hold_epochs, then linear to final_lr at decay_end_epoch, and final_lr after it (per
    step, fractional epochs; `utils/misc.py adjust_learning_rate` with its ditdh schedule)."""
    if epoch < args.hold_epochs:
        return args.lr
    frac = min(1.0, (epoch - args.hold_epochs) / max(1e-8, args.decay_end_epoch - args.hold_epochs))
    return args.lr + frac * (args.final_lr - args.lr)


class RandomLatents(torch.utils.data.Dataset):
    """--bench --random-latents: random moments in the shape of the latent cache of the tokenizer preset of
    the same name (the paper's: C = 128 on a 16 x 16 grid, ImageNet's 1,000 classes), so that the generator's
    step can be timed at the paper's sizes before any ImageNet cache exists. Item i is a function of i."""

    def __init__(self, preset, num):
        cfg, self.num = tokenizer.PRESETS[preset], num
        self.meta = {"channels": cfg["channels"], "grid": cfg["image_size"] // cfg["patch_size"],
                     "fingerprint": None, "tokenizer": None}
        self.num_classes = 1000 if preset == "paper" else distill.SyntheticShapes.num_classes
        self.mu, self.sigma = torch.zeros(cfg["channels"]), torch.ones(cfg["channels"])

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return self.num

    def __getitem__(self, i):
        return distill.indexed_noise((self.meta["grid"] ** 2, 2 * self.meta["channels"]), i), i % self.num_classes


def open_latents(args):
    """The cache and the tokenizer that decodes previews, checked against the cache (same weights
    fingerprint): --tokenizer, else the cache's own if its file still exists. None where no preview is
    made (--bench, --preview-every 0): loading and hashing the weights would buy nothing."""
    if args.random_latents:
        num = args.bench * args.batch_size * args.grad_accum * distill.world_info()[1]
        return RandomLatents(args.preset, num), None
    cache = tokenizer.LatentCache(args.latents, seed=args.seed)
    if args.bench or args.preview_every <= 0:
        return cache, None
    path = cache.meta["tokenizer"] if args.tokenizer is None else args.tokenizer
    if args.tokenizer is None and not (distill.is_url(path) or os.path.isfile(path)):
        distill.log(f"previews off: no tokenizer to decode them (the cache's, {path}, is gone); pass --tokenizer")
        return cache, None
    tok = tokenizer.load_tokenizer(path)
    tokenizer.check_meta(args.latents, {"fingerprint": distill.weights_fingerprint(tok)})
    return cache, tok


def build_model(args, cache):
    trunk, head = SIZES[args.model]
    config = dict(channels=cache.meta["channels"], grid=cache.meta["grid"], trunk=trunk, head=head,
                  num_classes=cache.num_classes, label_dropout=args.label_dropout)
    return DiTDH(**config), config


@torch.no_grad()
def save_preview(ema, tok, cache, path, device, num=8, seed=0):
    """EMA samples (Euler, 50 points, no guidance) decoded by the tokenizer, classes 0..num-1."""
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(num, ema.channels, ema.grid, ema.grid, generator=g).to(device)
    y = (torch.arange(num) % ema.num_classes).to(device)
    latents = sample(ema, z0, y, num_points=50)
    images = tok.to(device).detokenize(latents, cache.mu.to(device), cache.sigma.to(device))
    distill.save_grid([images], path)


def step_draws(moments, mu, sigma, grid, label_dropout):
    """Every random number of one rank's optimizer step, drawn for its whole batch (all --grad-accum
    micro-batches) at once: the latent sample, the noise x0, the time u, the dropped labels. The update
    then does not depend on how the batch is split (batch B x accum 2 = batch 2B x accum 1), and at accum
    1 the draws are those of flow_matching_loss, in its order."""
    x1 = tokenizer.sample_latent(moments, mu, sigma, grid)
    x0 = torch.randn_like(x1)
    u = torch.rand(len(x1), device=x1.device)
    drop = (torch.rand(len(x1), device=x1.device) < label_dropout if label_dropout > 0
            else torch.zeros(len(x1), dtype=torch.bool, device=x1.device))
    return x1, x0, u, drop


def train(args):
    rank, world, device = distill.setup_distributed()
    if rank == 0 and not args.bench:
        distill.prepare_out_dir(args.out)
    torch.manual_seed(args.seed * world + rank)
    cache, tok = open_latents(args)
    model, config = build_model(args, cache)
    model.to(device)
    ema = distill.make_ema(model)
    distill.enable_grad_checkpoint(model, args.grad_checkpoint)
    distill.enable_tf32(device)
    if args.compile:
        distill.compile_blocks(model, Block)
    ddp = nn.parallel.DistributedDataParallel(model) if distill.is_distributed() else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=0.0, fused=True)  # CPU too
    loader, sampler = distill.make_loader(cache, args.batch_size, args.seed, rank, world, args.workers, device)
    # a resumed run must read the same latents (the same cache of the same tokenizer)
    source = {"latents": args.latents and os.path.abspath(args.latents), "fingerprint": cache.meta["fingerprint"]}
    global_batch = args.batch_size * args.grad_accum * world
    run = distill.Run(args, "generator", device, len(cache), global_batch,
                      {"model": model, "ema": ema, "optimizer": opt},
                      match={"config": config, "source": source},
                      inputs_from=f"the latent cache {args.latents} (re-encode it: tokenizer.py encode, a fresh --out)")
    s = tokenizer.latent_shift(cache.meta["grid"], cache.meta["channels"])
    mu, sigma = cache.mu.to(device), cache.sigma.to(device)
    distill.log(f"DiT^DH-{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                f"{len(cache)} latents ({cache.meta['channels']} x {cache.meta['grid']}^2), shift {s:.3f}, "
                f"{world} process(es) x batch {args.batch_size} x accum {args.grad_accum}, {run.total} steps")
    model.train()
    while run.step < run.stop:
        epoch, in_epoch = divmod(run.step, run.steps_per_epoch)
        cache.set_epoch(epoch)
        sampler.set_position(epoch, in_epoch * args.grad_accum)
        for group in distill.micro_batches(loader, args.grad_accum):
            moments = torch.cat([m for m, _ in group]).to(device, non_blocking=True)
            y = torch.cat([labels for _, labels in group]).to(device, non_blocking=True)
            for g in opt.param_groups:
                g["lr"] = hold_then_linear(run.epoch, args)
            draws = step_draws(moments, mu, sigma, cache.meta["grid"], args.label_dropout)
            losses = []  # the logged and watched loss: the mean over the micro-batches
            for i, (y_i, x1, x0, u, drop) in enumerate(zip(*(d.split(args.batch_size) for d in (y, *draws)))):
                with distill.sync_at_last(ddp, i == args.grad_accum - 1):
                    with distill.autocast(device):
                        loss = flow_matching_loss(ddp, x1, y_i, s, x0, u, drop).mean()
                    (loss / args.grad_accum).backward()
                losses.append(loss.detach())
            loss = torch.stack(losses).mean()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            distill.update_ema(ema, model, args.ema)
            run.tick(len(y) * world, loss, draws[0])
            if run.log_due():
                distill.log(f"step {run.step}/{run.total} epoch {run.epoch:.2f} loss {loss.item():.4f} "
                            f"grad_norm {grad_norm.item():.3f} lr {opt.param_groups[0]['lr']:.2e} "
                            f"{run.meter.report()}")
            checkpoint(run, ema, cache, tok, device)
            if run.step >= run.stop or run.epoch_end():
                break
    def forward(n):  # --bench's activation count: the loss on n of the last micro-batch's samples
        return flow_matching_loss(model, x1[:n], y_i[:n], s, x0[:n], u[:n], drop[:n]).mean()

    result = run.done(f"DiT^DH-{args.model}", forward if run.bench and len(x1) > 1 else None)
    distill.cleanup_distributed()
    return result if args.bench else run.step


def checkpoint(run, ema, cache, tok, device):
    """latest.pt (distill.Run's cadence), milestones every --save-every steps, previews (rank 0, every
    --preview-every steps and where the run stops). The cache's statistics travel with the weights:
    sample.py needs them to decode."""
    args = run.args
    if run.bench:
        return
    if run.rank == 0 and tok is not None and run.every(args.preview_every):
        save_preview(ema, tok, cache, os.path.join(args.out, f"preview_{run.step:07d}.png"), device)
    due = run.checkpoint_due()
    milestone = args.save_every and run.step % args.save_every == 0  # its own cadence, not latest.pt's
    if not (due or milestone):
        return
    latents = {"root": os.path.abspath(args.latents), "fingerprint": cache.meta["fingerprint"],
               "tokenizer": cache.meta["tokenizer"], "mu": cache.mu, "sigma": cache.sigma}
    if due:
        run.save(latents=latents)
    if milestone:
        run.save(f"step_{run.step:07d}.pt", latents=latents)


def load_dit(path, device="cpu", weights="ema", heads=None):
    """Any generator checkpoint (a path or an https:// URL) -> DiTDH in eval mode on `device`, EMA weights by
    default whatever the layout: ours ({'config', 'ema', 'model', ...}) or the authors' released DiT^DH
    ('model_ema', else 'model'; their names are ours, the architecture is read off the weights, `heads` for
    unofficial widths). Its constructor arguments are at `.config`; `.latents` describes the cache it trained
    on (tokenizer, statistics mu and sigma), None for the authors'. Their EMA holds parameters only, so the
    RoPE tables (persistent buffers) are filled in."""
    ckpt = distill.load_checkpoint(path, ("generator",), "generator checkpoint")
    if "config" in ckpt:
        config, sd = ckpt["config"], ckpt[weights]
        model = DiTDH(**config)
    else:
        sd = dict(ckpt.get({"ema": "model_ema", "model": "model"}[weights], ckpt.get("model", ckpt)))
        if "s_projector.weight" not in sd:
            raise ValueError(f"{path} is not a DiT^DH checkpoint (no s_projector): pass the authors' "
                             f"DiTDDT_*.pth or one written by dit.py")
        config = official_config(sd, heads)
        model = DiTDH(**config)
        for k, v in model.state_dict().items():
            if k.endswith(("freqs_cos", "freqs_sin")):
                sd.setdefault(k, v)
    distill.load_strict(model, sd, f"generator checkpoint {path}")
    model.config, model.latents = config, ckpt.get("latents")
    return model.to(device).eval()


HEADS = {w: h for sizes in SIZES.values() for (w, _, h) in sizes}  # head count implied by each width


def official_config(sd, heads=None):
    """DiTDH arguments read off the authors' DiT^DH state dict (their names are ours). The head counts
    are not in the weights: the official widths imply them, other widths need `heads`."""
    dh, dt = sd["s_projector.weight"].shape
    widths = [sd[k].shape[1] for k in sd if k.startswith("blocks.") and k.endswith("adaLN_modulation.1.weight")]
    if heads is None and not {dt, dh} <= HEADS.keys():
        raise ValueError(f"a DiT^DH {dt} wide in its trunk and {dh} in its head is none of the sizes "
                         f"{sorted(SIZES)}: its head counts are not in the weights; load it with "
                         f"dit.load_dit(path, heads=(TRUNK, HEAD))")
    ht, hh = heads or (HEADS[dt], HEADS[dh])
    nt = widths.count(dt)
    if dt == dh:  # the weights do not say where a trunk ends and a head as wide begins: the size table does
        splits = {t[1] for t, h in SIZES.values() if (t[0], h[0], t[1] + h[1]) == (dt, dh, len(widths))}
        if len(splits) != 1:
            raise ValueError(f"a DiT^DH whose trunk and head are both {dt} wide, {len(widths)} blocks in all, is "
                             f"none of the sizes {sorted(SIZES)}: its trunk depth is not in the weights")
        nt = splits.pop()
    return dict(channels=sd["final_layer.linear.weight"].shape[0], grid=math.isqrt(sd["pos_embed"].shape[1]),
                trunk=(dt, nt, ht), head=(dh, len(widths) - nt, hh),
                num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1)


# The settings a flag acts under (distill.only_with)
CACHE = "--random-latents off (it benchmarks on noise)", lambda a: not a.random_latents
PREVIEWS = f"--preview-every above 0 and {CACHE[0]}", lambda a: a.preview_every > 0 and CACHE[1](a)


def build_parser(add_help=True):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=distill.HelpFormatter, add_help=add_help)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="sets the defaults below")
    only(p.add_argument("--latents", help="latent cache folder (tokenizer.py encode)"), *CACHE)
    only(p.add_argument("--tokenizer", help="tokenizer checkpoint for previews (default: the cache's "
                        "tokenizer, if it still exists)"), *PREVIEWS)
    p.add_argument("--out", default=distill.RUNS["dit"])
    p.add_argument("--model", choices=sorted(SIZES))
    p.add_argument("--epochs", type=distill.positive_int, help="train this many epochs (of the schedule below)")
    p.add_argument("--batch-size", type=distill.positive_int, help="per process and micro-batch")
    p.add_argument("--grad-accum", type=distill.positive_int, help="micro-batches per optimizer step: the global "
                   "batch is batch_size x grad_accum x processes")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each block's activations in backward: less memory, about a third more compute")
    p.add_argument("--lr", type=distill.positive, help="held for --hold-epochs")
    p.add_argument("--hold-epochs", type=distill.non_negative)
    p.add_argument("--final-lr", type=distill.non_negative, help="reached at --decay-end-epoch")
    p.add_argument("--decay-end-epoch", type=distill.non_negative, help="where the linear decay ends (not --epochs)")
    p.add_argument("--ema", type=distill.fraction)
    p.add_argument("--clip", type=distill.positive, default=1.0)
    p.add_argument("--label-dropout", type=distill.fraction, default=0.1)
    distill.add_run_flags(p, ckpt_every=1000, save_every=50000, save_unit="steps")
    p.add_argument("--preview-every", type=distill.non_negative_int, default=5000,
                   help="preview PNG every N steps (0: off)")
    only(p.add_argument("--random-latents", action="store_true", help="random latents of the preset's "
                        "shape instead of a cache"), "--bench N (training needs a cache)",
         lambda a: a.bench > 0)
    return p


def parse_args(argv=None):
    p, args = distill.parse_with_preset(build_parser, lambda first: PRESETS[first.preset], argv)
    if args.latents is None and not args.random_latents:
        p.error("--latents is required with --preset paper (or --bench N --random-latents)")
    return args


@distill.stage
def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
