"""Linear probing of frozen tokenizer features, including along the forward flow (the paper's LP).

RecTok's claim is that its latents are semantic, and stay so along the flow a generator trains on. This
stage measures it: token-averaged features of the training images train a linear classifier, evaluated on
held-out images (top-1, top-5). Features:
  * "L": the latent, the posterior mean (C-dim);
  * "SL": the last encoder layer before the latent head (D-dim);
  * "flow": the noisy latent z_tau = (1 - tau) * z + tau * gamma * eps at --tau, along the flow the
    tokenizer trained on (its gamma; eps a function of (seed, image index)).
Protocols:
  * "mae": BatchNorm without affine, then a linear layer; LARS, warm-up then cosine, 90 epochs (MAE's).
    By default on FIXED features (centre crop, no flip, extracted once): MAE itself trains on
    RandomResizedCrop + flip views, which --augment gives (an extraction per epoch, about epochs times
    the cost; the README gives the difference measured on the tiny preset);
  * "research": the authors' linear probe (`linear_probing/detok.py` with `detok.sh`): a linear layer on
    the token-averaged latent, Adam with weight decay 0 at a constant lr = adam_base_lr * batch / 256
    (0.1 x 4096 / 256 = 1.6), ONE epoch at a global batch of 4096, centre crops flipped at random (both
    orientations are extracted once and each epoch picks one per image). These are its defaults whatever
    the preset (`--protocol research -h` prints them).

Modes, each with only its own flags (`python probe.py MODE -h`):
    probe   the linear probe (the default when no mode is given)
    plot    several runs' probe.json on one accuracy-against-tau plot
    judge   an offline score of sample.py's samples by a classifier of the data (class accuracy, Frechet
            distance in its features; never an FID), for data no Inception covers

Run:
    python probe.py                                         # tiny: runs/tokenizer_ft on the built-in data
    python probe.py --sweep-tau 0 0.1 0.3 0.5 0.7 0.9       # accuracy against tau: JSON + PNG plot
    torchrun --nproc_per_node=8 probe.py --tokenizer FT/latest.pt --data /imagenet/train \\
        --val-data /imagenet/val --feature SL
    python probe.py plot runs/probe/probe.json runs/probe_nosem/probe.json --out runs/compare
    python probe.py judge --samples runs/samples/samples.npz  # the stand-in teacher judges the samples

Features are extracted once per run (each rank a shard, gathered) and reused across epochs; the linear
training is deterministic given --seed and identical on every rank. Writes OUT/probe.json (and, with
--sweep-tau, OUT/probe_tau.png); `judge` writes judge.json beside the samples.
"""
import argparse
import json
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw

import distill
import fid
import tokenizer
from distill import only_with as only

#################################################################################
#                                   Features                                    #
#################################################################################


@torch.no_grad()
def extract(model, data, kind, taus, args, device):
    """Token-averaged features of every image of `data` for each tau (L and SL use tau = 0): this rank's
    contiguous shard, gathered in index order. Returns ({tau: (N, dim)}, labels (N,))."""
    rank, world = distill.world_info()
    mine = distill.shard(data, rank, world)
    loader = torch.utils.data.DataLoader(mine, batch_size=args.batch_size, num_workers=args.workers,
                                         collate_fn=distill.collate)
    feats, labels, done = {tau: [] for tau in taus}, [], 0
    meter = distill.Throughput(device)
    for k, (x, y) in enumerate(loader):
        with distill.autocast(device):
            moments, hidden = model.encoder(x.to(device), return_features=True)
        z = tokenizer.Posterior(moments).mean
        for tau in taus:
            if kind == "SL":
                f = hidden.float()
            elif tau == 0:
                f = z
            else:
                index = mine.indices[done:done + len(y)]  # the images' indices in `data` key their noise
                eps = torch.stack([distill.indexed_noise(z.shape[1:], args.seed, i, 7) for i in index])
                f = tokenizer.forward_flow(z, tau, eps.to(device), model.gamma)
            feats[tau].append(f.mean(dim=1).cpu())  # float32: every rank holds the gathered set
        labels.append(y)
        done += len(y)
        meter.add(len(y) * world)
        if (k + 1) % args.log_every == 0 or k + 1 == len(loader):
            distill.log(f"features: {done}/{len(mine)} images on rank 0, {meter.report()}")
    return {tau: distill.gather(v) for tau, v in feats.items()}, distill.gather(labels)


#################################################################################
#                              Linear classifiers                               #
#################################################################################


class LARS(torch.optim.Optimizer):
    """LARS as in MAE's linear probing: for weight matrices, the update is scaled by
    trust = eta * ||w|| / ||g||; momentum SGD; 1-D parameters (biases) are left unscaled."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    w_norm, d_norm = p.norm(), d.norm()
                    trust = torch.where((w_norm > 0) & (d_norm > 0), g["eta"] * w_norm / d_norm, w_norm.new_ones(()))
                    d = d * trust
                buf = self.state[p].setdefault("mu", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])


def make_head(dim, num_classes, protocol):
    head = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    if protocol == "mae":  # BatchNorm without affine in front of the linear layer
        return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), head)
    return head


def train_heads(features, y, val, yv, num_classes, args, device="cpu"):
    """Train one linear probe per feature set (one per tau) on the same batches; top-1 and top-5 accuracy
    (%) of each on its validation features. `features(epoch)` gives {key: (N, dim)} training features for
    that epoch (fixed, a random flip of each image, or fresh augmented views); `val` is {key: (Nv, dim)}.
    mae: LARS, lr = base_lr * batch / 256, warm-up then cosine. research: Adam at a constant
    lr = adam_base_lr * batch / 256. Deterministic given --seed. The heads train on `device`, fed one batch
    at a time from host memory: ImageNet's MAE probe is 7,000 steps of batch 16,384, hours on one core
    (torchrun gives each process one thread)."""
    heads, opts = {}, {}
    mae = args.protocol == "mae"
    batch = min(args.probe_batch_size, len(y))
    lr = (args.base_lr if mae else args.adam_base_lr) * batch / 256
    for key, xv in val.items():
        torch.manual_seed(args.seed)  # every head starts from the same draw
        heads[key] = make_head(xv.shape[1], num_classes, args.protocol).to(device)
        opts[key] = (LARS(heads[key].parameters(), lr=lr, weight_decay=args.weight_decay) if mae
                     else torch.optim.Adam(heads[key].parameters(), lr=lr, weight_decay=args.weight_decay))
    g = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = len(y) // batch
    total = args.epochs * steps_per_epoch
    for epoch in range(args.epochs):
        xs = features(epoch)
        perm = torch.randperm(len(y), generator=g)
        for s in range(steps_per_epoch):
            idx = perm[s * batch:(s + 1) * batch]
            target = y[idx].to(device, non_blocking=True)
            step = epoch * steps_per_epoch + s
            factor = distill.warmup_cosine(step / total, args.warmup_epochs / args.epochs) if mae else 1
            for key, head in heads.items():
                for group in opts[key].param_groups:
                    group["lr"] = lr * factor
                loss = F.cross_entropy(head(xs[key][idx].to(device, non_blocking=True)), target)
                opts[key].zero_grad()
                loss.backward()
                opts[key].step()
    return {key: accuracy(head, val[key].to(device), yv.to(device), num_classes) for key, head in heads.items()}


@torch.no_grad()
def accuracy(head, xv, yv, num_classes):
    head.eval()
    top5 = head(xv).topk(min(5, num_classes), dim=1).indices
    return {"top1": (top5[:, 0] == yv).float().mean().item() * 100,
            "top5": (top5 == yv[:, None]).any(dim=1).float().mean().item() * 100}


#################################################################################
#                          Training views of the images                         #
#################################################################################


class View(torch.utils.data.Dataset):
    """The images of `data` as a training epoch sees them: flipped (p = 0.5) and, with `crop`, a
    RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, resized back to the image size; MAE's linear-probe
    augmentation), drawn from (seed, epoch, index) alone so that any number of ranks sees the same views.
    `flip=1.0` flips every image."""

    def __init__(self, data, seed, epoch, flip=0.5, crop=False):
        self.data, self.seed, self.epoch, self.flip, self.crop = data, seed, epoch, flip, crop

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        rng = np.random.default_rng([self.seed, self.epoch, i, 11])
        if self.crop:
            x = random_resized_crop(x, rng)
        return (x.flip(-1) if rng.random() < self.flip else x), y


def random_resized_crop(x, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop (same parameter law, 10 tries then the centre) with a numpy rng."""
    _, H, W = x.shape
    for _ in range(10):
        area = H * W * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= W and 0 < h <= H:
            top, left = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
            return TF.resized_crop(x, int(top), int(left), h, w, [H, W], antialias=True)
    return x


def training_features(model, train, kind, taus, args, device):
    """features(epoch) for train_heads, and the labels. mae: extracted once from the centre crops (the
    fixed-feature variant), or with --augment from fresh RandomResizedCrop + flip views every epoch (MAE's
    own protocol, an extraction per epoch). research: both orientations extracted once, and each epoch
    takes each image or its flip at random (the authors' training flips)."""
    if args.protocol == "mae" and args.augment:
        first, y = extract(model, View(train, args.seed, 0, crop=True), kind, taus, args, device)
        return (lambda epoch: first if epoch == 0 else extract(
            model, View(train, args.seed, epoch, crop=True), kind, taus, args, device)[0]), y
    xs, y = extract(model, train, kind, taus, args, device)
    if args.protocol == "mae":
        return (lambda epoch: xs), y
    flipped, _ = extract(model, View(train, args.seed, 0, flip=1.0), kind, taus, args, device)

    def features(epoch):
        pick = torch.from_numpy(np.random.default_rng([args.seed, epoch, 13]).random(len(y)) < 0.5)[:, None]
        return {tau: torch.where(pick, flipped[tau], xs[tau]) for tau in taus}

    return features, y


#################################################################################
#        The offline judge of samples: a classifier of the data at hand         #
#################################################################################


def load_judge(path, device):
    """A classifier checkpoint in distill.py's format (its teacher.pt: `config` {vit, num_classes} and the
    `ema` weights of the ViT and its head) -> the classifier in eval mode, and its checkpoint."""
    what = "judge: a classifier checkpoint in distill.py's format (teacher.pt)"
    ckpt = distill.load_checkpoint(path, ("teacher",), what)
    if "config" not in ckpt or "num_classes" not in ckpt["config"]:
        raise ValueError(f"{path} is not a {what}")
    judge = distill.StandinClassifier(**ckpt["config"])
    distill.load_strict(judge, ckpt["ema"], f"judge {path}")
    judge.image_size = ckpt["config"]["vit"]["img_size"]
    return judge.to(device).eval(), ckpt


@torch.no_grad()
def judge_outputs(judge, images, device, batch_size=250):
    """uint8 images (N, H, W, 3) -> the judge's logits (N, classes) and features (N, width), float64: the
    max-pooled patch tokens its head classifies. Images are resized to the judge's size if they differ."""
    logits, feats = [], []
    for s in range(0, len(images), batch_size):
        # B x H x W x 3 -> B x 3 x H x W
        x = torch.from_numpy(np.array(images[s:s + batch_size])).permute(0, 3, 1, 2).float()  # a copy of the map
        x = (x / 127.5 - 1).to(device)
        if x.shape[-1] != judge.image_size:
            x = F.interpolate(x, size=judge.image_size, mode="bilinear", align_corners=False, antialias=True)
        f = judge.vit.patch_tokens(x).amax(dim=1)
        logits.append(judge.head(f).double().cpu())
        feats.append(f.double().cpu())
    return torch.cat(logits), torch.cat(feats)


def judge_scores(judge, images, labels, real, real_labels, device):
    """What the judge says of generated images (never an FID): the fraction it assigns to the class they
    were generated for (chance: 1 / classes), the same on held-out real images (the ceiling), and the
    Frechet distance between the two sets in its feature space (float64 statistics, fid.py's code)."""
    logits, feats = judge_outputs(judge, images, device)
    real_logits, real_feats = judge_outputs(judge, real, device)
    accuracy = (logits.argmax(1).numpy() == np.asarray(labels)).mean()
    ceiling = (real_logits.argmax(1).numpy() == np.asarray(real_labels)).mean()
    distance = fid.frechet_distance(*fid.statistics(feats.numpy()), *fid.statistics(real_feats.numpy()))
    return {"judge_class_accuracy": float(accuracy), "judge_accuracy_on_real": float(ceiling),
            "judge_frechet_distance": distance, "chance": 1 / logits.shape[1]}


def real_images(data, num):
    """The first `num` images of a held-out data set as uint8 (N, H, W, 3) and their labels."""
    pairs = [data[i] for i in range(min(num, len(data)))]
    images = torch.stack([x for x, _ in pairs])
    images = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)  # B x H x W x 3
    return images.numpy(), [y for _, y in pairs]


def judge(args):
    """`probe.py judge`: sample.py's samples (samples.npz: arr_0, labels) scored by --judge against
    the held-out real images of --data, at the samples' size; writes --json (default: judge.json beside
    the samples)."""
    if not os.path.isfile(args.samples):
        raise FileNotFoundError(f"--samples {args.samples} not found: run sample.py first, or pass its "
                                f"samples.npz")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, labels = fid.npz_images(args.samples), np.load(args.samples)["labels"]  # images mapped
    classifier, ckpt = load_judge(args.judge, device)
    real = distill.build_dataset(args.data, images.shape[1], "val", args.num_real, every_rank=False)
    classes = ckpt["config"]["num_classes"]
    if labels.max() >= classes or real.num_classes != classes:
        raise ValueError(f"judge {args.judge} classifies {classes} classes; the samples are labelled "
                         f"up to {labels.max()} and --data {args.data} has {real.num_classes}: pass --judge "
                         f"a classifier of the samples' data (`python distill.py --data DIR`) and its images")
    scores = judge_scores(classifier, images, labels, *real_images(real, args.num_real), device)
    scores.update(judge=args.judge, data=args.data, samples=args.samples, num_samples=len(labels))
    out = args.json or os.path.join(os.path.dirname(os.path.abspath(args.samples)), "judge.json")
    distill.write_json(out, scores)
    distill.log(f"judge {args.judge}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()
                                                    if isinstance(v, float)) + f"; wrote {out}")
    return scores


#################################################################################
#                                 Plot and CLI                                  #
#################################################################################


COLOURS = [(30, 90, 200), (220, 80, 30), (40, 150, 60), (150, 60, 170), (120, 120, 120)]


def plot_tau(runs, path, chance=None, size=(520, 340), margin=48):
    """Accuracy against tau for one or more runs ({name: results}) on one plot, with a dashed chance line,
    drawn with PIL (no plotting package)."""
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    w, h = size[0] - 2 * margin, size[1] - 2 * margin

    def xy(tau, acc):
        return margin + tau * w, margin + h - acc / 100 * h

    draw.line([(margin, margin), (margin, margin + h), (margin + w, margin + h)], fill="black")
    for acc in (0, 25, 50, 75, 100):
        draw.text((4, xy(0, acc)[1] - 6), f"{acc}%", fill="black")
        draw.line([xy(0, acc), xy(1, acc)], fill=(225, 225, 225))
    for tau in (0, 0.25, 0.5, 0.75, 1.0):
        draw.text((xy(tau, 0)[0] - 8, margin + h + 6), f"{tau:g}", fill="black")
    draw.text((margin + w // 2 - 10, size[1] - 18), "tau", fill="black")
    draw.text((margin, 12), "linear probe top-1 along the flow", fill="black")
    if chance is not None:
        y = xy(0, chance)[1]
        for x0 in range(margin, margin + w, 10):
            draw.line([(x0, y), (min(x0 + 5, margin + w), y)], fill="black")
        draw.text((margin + w - 44, y + 4), "chance", fill="black")  # below: the runs may cross above it
    for k, (name, results) in enumerate(runs.items()):
        colour = COLOURS[k % len(COLOURS)]
        points = [xy(r["tau"], r["top1"]) for r in results]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.text((margin + 8, margin + 4 + 14 * k), name, fill=colour)
    distill.atomic_write(path, lambda f: img.save(f, format="PNG"))


def plot_runs(args):
    """`probe.py plot A/probe.json B/probe.json`: those runs on one plot, named by their folders."""
    runs, out = {}, args.out
    for path in args.runs:
        with open(path) as f:
            saved = json.load(f)
        runs[os.path.basename(os.path.dirname(os.path.abspath(path)))] = saved["results"]
    os.makedirs(out, exist_ok=True)
    plot_tau(runs, os.path.join(out, "probe_tau.png"), saved.get("chance"))
    print(f"wrote {os.path.join(out, 'probe_tau.png')}")


@distill.stage
def main(argv=None):
    args = parse_args(argv)
    if args.mode != "probe":
        return {"plot": plot_runs, "judge": judge}[args.mode](args)
    rank, world, device = distill.setup_distributed()
    if rank == 0:  # an unwritable --out fails now, not after the extraction and the heads (hours on ImageNet)
        distill.prepare_out_dir(args.out)
    model = tokenizer.load_tokenizer(args.tokenizer, device=device)
    config = model.config
    taus = args.sweep_tau or [args.tau]  # parse_args: --tau is 0 unless the feature is the flow
    kind = "flow" if args.sweep_tau else args.feature
    train, val = distill.train_val(args.data, config["img_size"], args.val_data, args.num_train, args.num_val,
                                   args.data_seed, args.skip_bad_images)
    features, y = training_features(model, train, kind, taus, args, device)
    xvs, yv = extract(model, val, kind, taus, args, device)
    accs = train_heads(features, y, xvs, yv, train.num_classes, args, device)
    results = []
    for tau in taus:
        acc = accs[tau]
        results.append({"feature": kind, "tau": tau, **acc})
        distill.log(f"{kind} tau {tau:.2f}: top-1 {acc['top1']:.2f}%  top-5 {acc['top5']:.2f}% "
                    f"({len(y)} train / {len(yv)} val, {args.protocol} protocol)")
    if rank == 0:
        chance = 100 / train.num_classes
        distill.write_json(os.path.join(args.out, "probe.json"), {
            "tokenizer": args.tokenizer, "protocol": args.protocol, "chance": chance, "results": results})
        if args.sweep_tau:
            plot_tau({os.path.basename(os.path.normpath(args.out)): results},
                     os.path.join(args.out, "probe_tau.png"), chance)
        distill.log(f"wrote {args.out}/probe.json")
    distill.cleanup_distributed()
    return results


PRESETS = {
    # MAE's ImageNet linear probe: base_lr 0.1 at batch 16384 (lr 6.4), 90 epochs, 10 warm-up, on the whole
    # train and val sets.
    "paper": dict(base_lr=0.1, probe_batch_size=16384, num_train=None, num_val=None, workers=distill.IMAGE_WORKERS),
    # A few thousand images: batch 256 gives ~1000 LARS steps. LARS moves a weight matrix by lr x 0.001 of
    # its norm per step, so so few steps need a far larger lr (measured in the README's "Linear probing").
    # Loader workers off: a few thousand small images extract faster than worker processes start.
    "tiny": dict(base_lr=20.0, probe_batch_size=256, num_train=3000, num_val=1000, workers=0),
}


# The authors' probe (`linear_probing/detok.sh`, 512 per GPU on 8): its defaults under --protocol research,
# whatever the preset, so that a paper-preset run does not train it for MAE's 90 epochs at batch 16,384.
RESEARCH = dict(epochs=1, probe_batch_size=4096, adam_base_lr=0.1, weight_decay=0.0)


def protocol_defaults(first):
    """The preset's values, then the research protocol's own (preset_defaults of distill.parse_with_preset)."""
    return dict(PRESETS[first.preset], **(RESEARCH if first.protocol == "research" else {}))


def build_parser(add_help=True):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=distill.HelpFormatter, add_help=add_help)
    p.add_argument("--tokenizer", default=os.path.join(distill.RUNS["tokenizer_ft"], "latest.pt"))
    p.add_argument("--data", default="synthetic", help="'synthetic' or a class-folder train set")
    p.add_argument("--val-data", default=None,
                   help="class-folder val set (default: its val split, or every 50th image of --data)")
    p.add_argument("--skip-bad-images", action="store_true", help="leave out (and count) unreadable files")
    p.add_argument("--num-train", type=distill.positive_int, help="train images (None: all)")
    p.add_argument("--num-val", type=distill.positive_int, help="val images (None: all)")
    p.add_argument("--data-seed", type=int, default=1, help="seed of the built-in data (a fresh draw)")
    p.add_argument("--feature", default="L", choices=["L", "SL", "flow"])
    only(p.add_argument("--tau", type=float, default=0.0, help="noise level of the 'flow' feature, in [0, 1]"),
         "--feature flow", lambda a: a.feature == "flow")
    only(p.add_argument("--sweep-tau", type=float, nargs="+", default=None, help="probe 'flow' at these taus"),
         "--feature L or flow (SL has no tau)", lambda a: a.feature != "SL")
    p.add_argument("--protocol", default="mae", choices=["mae", "research"],
                   help="mae: BN + linear, LARS, warm-up + cosine; research: the authors' linear head, Adam "
                        "at a constant lr, training flips")
    mae = "--protocol mae", lambda a: a.protocol == "mae"
    only(p.add_argument("--augment", action="store_true",
                        help="fresh RandomResizedCrop + flip views each epoch (MAE's protocol; an extraction per "
                             "epoch) instead of fixed centre-crop features"), *mae)
    research = "; --protocol research: {}"
    p.add_argument("--epochs", type=distill.positive_int, default=90,
                   help="mae: MAE's 90" + research.format(RESEARCH["epochs"]))
    only(p.add_argument("--warmup-epochs", type=distill.non_negative, default=10), *mae)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="sets the defaults below")
    only(p.add_argument("--base-lr", type=distill.positive, help="lr = base_lr * batch / 256"), *mae)
    only(p.add_argument("--adam-base-lr", type=distill.positive, default=RESEARCH["adam_base_lr"],
                        help="Adam lr = adam_base_lr * batch / 256"), "--protocol research",
         lambda a: a.protocol == "research")
    p.add_argument("--weight-decay", type=distill.non_negative, default=0.0,
                   help="mae: MAE's 0" + research.format(RESEARCH["weight_decay"]))
    p.add_argument("--probe-batch-size", type=distill.positive_int,
                   help="linear-probe batch, the global one (the preset's)"
                        + research.format(RESEARCH["probe_batch_size"]))
    p.add_argument("--batch-size", type=distill.positive_int, default=64, help="feature extraction batch per process")
    distill.add_run_flags(p, train=False)
    p.add_argument("--out", default=distill.RUNS["probe"])
    return p


def build_plot_parser():
    p = argparse.ArgumentParser(prog="probe.py plot", description=plot_runs.__doc__,
                                formatter_class=distill.HelpFormatter)
    p.add_argument("runs", nargs="+", metavar="PROBE_JSON", help="probe.json files, one curve each")
    p.add_argument("--out", default=distill.RUNS["probe"], help="writes OUT/probe_tau.png")
    return p


def build_judge_parser():
    p = argparse.ArgumentParser(prog="probe.py judge", description=judge.__doc__,
                                formatter_class=distill.HelpFormatter)
    p.add_argument("--samples", default=os.path.join(distill.RUNS["samples"], "samples.npz"))
    p.add_argument("--judge", default=distill.STANDIN_TEACHER, help="a classifier of the data: a teacher.pt")
    p.add_argument("--data", default="synthetic", help="held-out real images ('synthetic': its val split)")
    p.add_argument("--num-real", type=distill.bounded(int, 2), default=1000, help="how many real images")
    p.add_argument("--json", default=None, help="default: judge.json beside --samples")
    return p


def parse_args(argv=None):
    """`probe.py [probe | plot | judge] [flags]`; no mode means probe."""
    mode, argv = distill.split_mode(argv, ("probe", "plot", "judge"))
    if mode != "probe":
        args = (build_plot_parser() if mode == "plot" else build_judge_parser()).parse_args(argv)
        args.mode = mode
        return args
    p, args = distill.parse_with_preset(build_parser, protocol_defaults, argv)
    args.mode = mode
    taus = args.sweep_tau or [args.tau]
    mae = args.protocol == "mae"
    distill.refuse(p, (not all(0 <= tau <= 1 for tau in taus), f"--tau {taus}: from 0 (clean) to 1 (noise)"),
                   (mae and args.warmup_epochs > args.epochs,
                    f"--warmup-epochs {args.warmup_epochs}: at most --epochs {args.epochs}"),
                   (mae and min(args.probe_batch_size, args.num_train or 2) < 2,
                    "--probe-batch-size: MAE's BatchNorm needs batches (and --num-train) of 2 or more"))
    return args


if __name__ == "__main__":
    main()
