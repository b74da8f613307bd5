"""Sampling: class-balanced images from a trained DiT^DH, decoded by the RecTok tokenizer, and their FID
(`models/DDT.py`).

Image i of a run has label i % num_classes and initial noise drawn from a generator seeded by (seed, i)
alone; the index space is cut into batches of --batch-size that are dealt whole to the ranks in contiguous
runs (each process generates one batch at a time), so every image is computed in the same batch whatever
the number of processes, and the files are the same with 1 GPU or 64. A crash resumes by skipping the
batches whose PNGs all exist.

Run:
    python sample.py                                          # tiny: 100 samples from runs/dit, 50 points
    torchrun --nproc_per_node=8 sample.py --preset paper --dit runs/dit_xl/latest.pt --num-images 50000 \\
        --ref-stats /refs/VIRTUAL_imagenet256_labeled.npz     # gFID-50K without guidance
    ... --guide runs/dit_s/latest.pt --cfg 1.29               # autoguidance (the paper's guided numbers)
    ... --cfg 1.5 --cfg-interval 0.0 0.7                      # classifier-free guidance on an interval
    sample.py --preset paper --dit DiTDDT_xl.pth --guide DiTDDT_s.pth --cfg 1.29 --tokenizer RecTok_decft.pth \\
        --latent-stats /latents/rectok/stats.npz ...          # the authors' released weights

Writes OUT/images/{i:06d}.png, OUT/provenance.json (what made them: the generator, guide and tokenizer
weights' fingerprints, seed, steps, guidance, count; a folder resumes only when all of it matches),
OUT/samples.npz (`arr_0` (N, H, W, 3) uint8 and `labels`, the layout the ADM evaluator and fid.py read),
OUT/preview.png, and with --ref-stats OUT/metrics.json (FID, IS).
"""
import argparse
import contextlib
import json
import math
import os
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

import dit
import distill
import fid
import tokenizer
from distill import only_with as only


def my_batches(num, batch_size, rank, world):
    """Batches [k*B, (k+1)*B) dealt whole to ranks in contiguous runs (uneven shards allowed): a batch is
    what one process generates at once, so the batches do not depend on the number of processes."""
    count = math.ceil(num / batch_size)
    lo, hi = rank * count // world, (rank + 1) * count // world
    return [range(k * batch_size, min(num, (k + 1) * batch_size)) for k in range(lo, hi)]


def load_generator(path, device, latent_stats):
    """A generator's EMA weights (ours or the authors') and the latent statistics to de-normalise with:
    --latent-stats if given (the authors' checkpoints carry none), else those of the cache it trained on.
    Returns (model, latents info or None, mu, sigma)."""
    model = dit.load_dit(path, device)
    latents = model.latents
    if latent_stats:
        if not os.path.isfile(latent_stats):
            raise FileNotFoundError(f"--latent-stats {latent_stats} not found: pass the stats.npz of a latent "
                                    f"cache encoded with the generator's tokenizer (`tokenizer.py encode`)")
        stats = np.load(latent_stats)
        return model, latents, torch.from_numpy(stats["mean"]).float(), torch.from_numpy(stats["std"]).float()
    if latents is None:
        raise ValueError(f"{path} is the authors' generator, which does not record its latent statistics: "
                         f"pass --latent-stats (stats.npz of a cache encoded with their tokenizer)")
    return model, latents, latents["mu"], latents["sigma"]


def load_models(args, device):
    """Generator (EMA), optional autoguidance model and the tokenizer, checked against each other."""
    model, latents, mu, sigma = load_generator(args.dit, device, args.latent_stats)
    tok_path = args.tokenizer or (latents or {}).get("tokenizer")
    if tok_path is None:
        raise ValueError("the authors' generator does not name its tokenizer: pass --tokenizer RecTok_decft.pth")
    tok = tokenizer.load_tokenizer(tok_path, device=device)
    tok.fingerprint = distill.weights_fingerprint(tok)  # hashed once: checked here, recorded in provenance.json
    if latents is not None and tok.fingerprint != latents["fingerprint"]:
        raise ValueError(f"tokenizer {tok_path} is not the one whose latents trained {args.dit} (weights "
                         f"fingerprint differs); pass the tokenizer checkpoint that wrote its latent cache")
    if (tok.channels, tok.grid) != (model.channels, model.grid):
        raise ValueError(f"tokenizer latents ({tok.channels} x grid {tok.grid}) do not match the generator "
                         f"({model.channels} x grid {model.grid})")
    guide = load_guide(args, model, latents, device) if args.guide else None
    return model, guide, tok, mu.to(device), sigma.to(device)


def load_guide(args, model, latents, device):
    """The autoguidance model: a weaker generator of the same latents, so the same shape and classes and,
    where both record it, the cache of the same tokenizer (a guide of other latents steers toward noise)."""
    guide, guide_latents = load_generator(args.guide, device, args.latent_stats)[:2]
    made = [(m.channels, m.grid, m.num_classes) for m in (guide, model)]
    if made[0] != made[1]:
        raise ValueError(f"guide {args.guide} makes {made[0]} (channels, grid, classes), the generator {made[1]}: "
                         f"pass a guide trained on the generator's latents")
    if latents and guide_latents and guide_latents["fingerprint"] != latents["fingerprint"]:
        raise ValueError(f"guide {args.guide} trained on the latents of another tokenizer than {args.dit}: pass a "
                         f"guide trained on the same latent cache")
    return guide


@torch.no_grad()
def generate(args, model, guide, tok, mu, sigma, batch, device):
    """One batch of indices -> uint8 images (B, H, W, 3) and labels."""
    labels = torch.tensor([i % model.num_classes for i in batch], device=device)
    z0 = torch.stack([distill.indexed_noise((model.channels, model.grid, model.grid), args.seed, i) for i in batch])
    with distill.autocast(device) if args.bf16 else contextlib.nullcontext():
        images = dit.generate(model, tok, labels, args.steps, args.cfg, tuple(args.cfg_interval), guide, z0,
                              mu, sigma)
    # B x 3 x H x W -> B x H x W x 3
    return (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy(), labels.cpu()


def pack(args, num, num_classes):
    """All PNGs -> one .npz (arr_0, labels) and a preview grid."""
    def read(i):
        with Image.open(os.path.join(args.out, "images", f"{i:06d}.png")) as im:
            return np.asarray(im)

    arr = np.empty((num, *read(0).shape), np.uint8)  # filled in place: np.stack would hold every image twice
    for i in range(num):
        arr[i] = read(i)
    labels = np.arange(num) % num_classes
    distill.atomic_write(os.path.join(args.out, "samples.npz"), lambda f: np.savez(f, arr_0=arr, labels=labels))
    save_preview(arr, labels, os.path.join(args.out, "preview.png"))


def save_preview(images, labels, path, classes=10, cols=8):
    """One row per class (the first `classes`), up to `cols` samples each, the class index at the left."""
    h, w = images.shape[1:3]
    rows = [np.flatnonzero(labels == c)[:cols] for c in range(min(classes, labels.max() + 1))]
    margin = 24
    canvas = Image.new("RGB", (margin + cols * w, len(rows) * h), "white")
    draw = ImageDraw.Draw(canvas)
    for r, idx in enumerate(rows):
        draw.text((2, r * h + h // 2 - 6), str(r), fill="black")
        for c, i in enumerate(idx):
            canvas.paste(Image.fromarray(images[i]), (margin + c * w, r * h))
    distill.atomic_write(path, lambda f: canvas.save(f, format="PNG"))


def provenance(args, model, guide, tok, mu, sigma):
    """Everything that decides the images: a folder of samples resumes only if all of it matches. Not the
    batch size or the count: each image's noise and label follow from its index alone, so a retry after
    running out of memory may take smaller batches, and a set may be extended."""
    return {"generator": distill.weights_fingerprint(model), "tokenizer": tok.fingerprint,
            "guide": distill.weights_fingerprint(guide) if guide is not None else None,
            "latent_stats": distill.weights_fingerprint({"mu": mu, "sigma": sigma}), "seed": args.seed,
            "steps": args.steps, "cfg": args.cfg, "cfg_interval": list(args.cfg_interval), "bf16": args.bf16}


def check_provenance(args, made):
    """Refuse to mix images made otherwise into this run's folder; record what makes them otherwise."""
    path = os.path.join(args.out, "provenance.json")
    folder = os.path.join(args.out, "images")
    images = os.path.isdir(folder) and any(f.endswith(".png") for f in os.listdir(folder))
    if os.path.isfile(path) and images:
        with open(path) as f:
            old = json.load(f)
        wrong = [f"{k}: {old.get(k)} there, {v} now" for k, v in made.items() if old.get(k) != v]
        if wrong:
            raise ValueError(f"{args.out} holds samples made with other settings ({'; '.join(wrong)}): sample "
                             f"into a fresh --out, or delete {folder} and {path}")
    elif images:
        raise ValueError(f"{folder} holds images but no provenance.json saying what made them: sample into a "
                         f"fresh --out, or delete {folder}")
    elif distill.world_info()[0] == 0:  # a folder with no image yet is free (a retry after a crash)
        distill.write_json(path, made)


@distill.stage
def main(argv=None):
    args = parse_args(argv)
    rank, world, device = distill.setup_distributed()
    folder = os.path.join(args.out, "images")
    if rank == 0:  # the run holds --out, where it packs and scores, and its images folder
        for path in (args.out, folder):
            distill.prepare_out_dir(path)
    model, guide, tok, mu, sigma = load_models(args, device)
    if args.compile:
        for net in (model, guide, tok):
            if net is not None:
                distill.compile_blocks(net, dit.Block, tokenizer.Block)
    # before sampling (hours for 50,000 images): a wrong --ref-stats or Inception fails now
    ref = fid.load_statistics(args.ref_stats) if args.ref_stats else None
    inception = fid.FIDInception().load(args.inception_weights).to(device) if ref is not None else None
    check_provenance(args, provenance(args, model, guide, tok, mu, sigma))
    distill.barrier()  # the folder exists and provenance.json says what fills it
    batches = my_batches(args.num_images, args.batch_size, rank, world)
    todo = [b for b in batches if not all(os.path.isfile(os.path.join(folder, f"{i:06d}.png")) for i in b)]
    before = len([f for f in os.listdir(folder) if f.endswith(".png")])
    distill.log(f"sampling {args.num_images} images ({args.steps} grid points, cfg {args.cfg}"
                f"{', autoguidance' if guide else ''}) on {world} process(es); {before} already in {folder}")
    t0, made, preemption = time.time(), 0, distill.Preemption()
    for k, batch in enumerate(todo):
        images, _ = generate(args, model, guide, tok, mu, sigma, batch, device)
        for i, img in zip(batch, images):
            distill.save_png(img, os.path.join(folder, f"{i:06d}.png"))
        made += len(batch)
        if (k + 1) % args.log_every == 0 or k + 1 == len(todo):
            distill.log(f"{min(args.num_images, before + made * world)}/{args.num_images} images, "
                        f"{made * world / (time.time() - t0):.1f} img/s (all ranks), "
                        f"peak mem {distill.peak_memory_gb(device):.2f} GB")
        if preemption.stopped(f"{before + made * world} of {args.num_images} images"):
            return None
    distill.wait_for_all()  # ranks resumed on another process count hold unequal shares
    if rank == 0:
        pack(args, args.num_images, model.num_classes)
        distill.log(f"wrote {args.num_images} PNGs, samples.npz and preview.png in {args.out}")
    distill.wait_for_all()  # rank 0 packs the PNGs alone
    metrics = evaluate(args, inception, ref, device) if ref is not None else {}
    if not metrics:
        distill.log("no --ref-stats given: images written, FID not computed")
    distill.cleanup_distributed()
    return metrics


def evaluate(args, inception, ref, device):
    """FID and IS of samples.npz against `ref`, the --ref-stats (ADM reference batch or fid.py statistics)."""
    feats, logits = fid.features(inception, os.path.join(args.out, "samples.npz"), args.fid_batch_size,
                                 args.fid_mode, device)
    metrics = {"fid": fid.frechet_distance(*fid.statistics(feats), *ref), "num_samples": len(feats),
               "ref_stats": args.ref_stats, "dit": args.dit, "steps": args.steps, "cfg": args.cfg,
               "cfg_interval": args.cfg_interval, "guide": args.guide, "seed": args.seed}
    if len(logits) >= 10:
        metrics["inception_score"], metrics["inception_score_std"] = fid.inception_score(logits)
    if distill.world_info()[0] == 0:
        distill.write_json(os.path.join(args.out, "metrics.json"), metrics)
        distill.log(json.dumps(metrics))
    return metrics


PRESETS = {
    "paper": dict(steps=150),  # the released sampler: 150 grid points
    # On the tiny pipeline 50 points score as 150 do, in less than half the time (measured in the README).
    "tiny": dict(steps=50),
}


# The settings a flag acts under (distill.only_with)
GUIDED = "--cfg other than 1 (at 1 guidance changes nothing)", lambda a: a.cfg != 1
SCORED = "--ref-stats (the reference statistics .npz of FID)", lambda a: a.ref_stats


def build_parser(add_help=True):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=distill.HelpFormatter, add_help=add_help)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="sets the defaults below")
    p.add_argument("--dit", default=os.path.join(distill.RUNS["dit"], "latest.pt"),
                   help="generator checkpoint (EMA weights are used)")
    p.add_argument("--tokenizer", default=None, help="tokenizer checkpoint (default: the one the "
                   "generator's latent cache came from)")
    only(p.add_argument("--guide", help="autoguidance: the weaker generator (e.g. DiT^DH-S)"), *GUIDED)
    p.add_argument("--latent-stats", default=None, help="the authors' generators: stats.npz of a cache "
                   "encoded with their tokenizer (`tokenizer.py encode --ckpt RecTok_decft.pth`)")
    # not `--num`: torchrun would take it for an abbreviation of its own --numa-binding
    p.add_argument("--num-images", type=distill.positive_int, default=100, help="number of images (the paper: 50000)")
    p.add_argument("--steps", type=int, help="Euler grid points (steps + 1)")
    p.add_argument("--cfg", type=distill.non_negative, default=1.0,
                   help="guidance scale (CFG, or autoguidance with --guide)")
    only(p.add_argument("--cfg-interval", type=float, nargs=2, default=[0.0, 1.0],
                        metavar=("LOW", "HIGH"), help="guidance acts for LOW <= t <= HIGH (generator "
                        "time, 1 = data)"), *GUIDED)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=distill.positive_int, default=50, help="per process: each rank generates "
                   "whole batches of this many, the same batches (so the same images) on any number of processes")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the generator's and the decoder's "
                   "blocks (the first batches build kernels)")
    p.add_argument("--out", default=distill.RUNS["samples"])
    p.add_argument("--ref-stats", default=None, help="reference statistics .npz for FID (mu, sigma)")
    only(p.add_argument("--inception-weights"), *SCORED)
    only(p.add_argument("--fid-mode", default="tf", choices=["tf", "pytorch-fid"]), *SCORED)
    only(p.add_argument("--fid-batch-size", type=distill.positive_int, default=100), *SCORED)
    p.add_argument("--log-every", type=distill.positive_int, default=1, help="log every N batches")
    return p


def parse_args(argv=None):
    p, args = distill.parse_with_preset(build_parser, lambda first: PRESETS[first.preset], argv)
    lo, hi = args.cfg_interval
    distill.refuse(p, (args.steps < 2, f"--steps {args.steps}: the Euler grid needs 2 points"),
                   (not 0 <= lo <= hi <= 1, f"--cfg-interval {lo} {hi}: 0 <= LOW <= HIGH <= 1"),
                   (args.num_images < 2 and args.ref_stats, f"--num-images {args.num_images}: FID needs 2"))
    return args


if __name__ == "__main__":
    main()
