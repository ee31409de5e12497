"""Train ShapesCLIP-RN-T, the project's own small CLIP, from scratch on synthetic shapes (offline, seeded).

    python -m training.train_shapes --out DIR [--steps N --batch B --seed S --quiet]

Everything is open_clip's own: the model is built from the committed model config
(exporter/sources/builtin/ShapesCLIP-RN-T.json, via open_clip.add_model_config + create_model), the
tokenizer is open_clip.get_tokenizer (the default SimpleTokenizer at the config's context length), the
loss is open_clip.loss.ClipLoss. Images are normalised with the mean/std open_clip's preprocess config
gives the model (its defaults: OpenAI's CLIP mean/std), the data come from
clip_triton.exporter.parity.shapes (a fixed, pre-rendered pool of "train" samples; the evaluation uses
the disjoint "heldout" split). DIR receives model.safetensors (FP32 state_dict) and metrics.json.
The model card is exporter/sources/builtin/ShapesCLIP-RN-T.md.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.transform import PreprocessCfg, image_transform_v2
from safetensors.torch import save_file

from clip_triton.exporter.parity import shapes

MODEL_NAME = "ShapesCLIP-RN-T"
BUILTIN = Path(__file__).resolve().parents[1] / "exporter" / "sources" / "builtin"
CONFIG = BUILTIN / f"{MODEL_NAME}.json"

# Share of each generator in the training pool (shapes.sample / pair_sample / count_sample).
MIXTURE = {"single": 0.75, "pair": 0.15, "count": 0.10}
_MAKERS = {"single": shapes.sample, "pair": shapes.pair_sample, "count": shapes.count_sample}
_EVAL_GENERATOR = {"relation": "pair", "count": "count"}  # every other label set: "single"


# ------------------------------------------------------------------------------------------- model

def build_model(config: Path = CONFIG) -> tuple[torch.nn.Module, Any, str]:
    """The model (random init), its tokenizer and its name, from an open_clip model-config file."""
    open_clip.add_model_config(config)
    name = config.stem
    model = open_clip.create_model(name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(name)
    return model, tokenizer, name


def parameter_count(model: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    visual = sum(p.numel() for p in model.visual.parameters())
    token = model.token_embedding.weight.numel()
    return {"total": total, "visual": visual, "text": total - visual, "token_embedding": token}


def _normaliser(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    cfg = dict(open_clip.get_model_preprocess_cfg(model))
    mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)
    return mean, std, cfg


def _pixels(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (already the model's image size) -> normalised float NCHW: what open_clip's eval
    preprocess gives for an image of exactly that size (checked in evaluate())."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean) / std


# -------------------------------------------------------------------------------------------- data

def _pool_plan(pool: int) -> list[tuple[str, int]]:
    counts = {kind: int(round(pool * share)) for kind, share in MIXTURE.items()}
    counts["single"] = pool - counts["pair"] - counts["count"]
    return [(kind, i) for kind, n in counts.items() for i in range(n)]


def render_pool(pool: int, size: int, tokenizer: Any,
                quiet: bool) -> tuple[np.ndarray, torch.Tensor, np.ndarray, dict[str, int]]:
    """Render the training pool: uint8 images (N, size, size, 3), their tokenised captions and each
    sample's (first) object colour as an index into shapes.COLOURS."""
    plan = _pool_plan(pool)
    images = np.empty((len(plan), size, size, 3), dtype=np.uint8)
    colours = np.empty(len(plan), dtype=np.int64)
    names = list(shapes.COLOURS)
    captions = []
    start = time.perf_counter()
    for row, (kind, index) in enumerate(plan):
        s = _MAKERS[kind]("train", index, size)
        images[row] = np.asarray(s.image)
        captions.append(s.caption)
        colours[row] = names.index((s.labels.get("colour") or s.labels["first"]).split(" ")[0])
        if not quiet and (row + 1) % 10000 == 0:
            print(f"rendered {row + 1}/{len(plan)} ({time.perf_counter() - start:.0f}s)", flush=True)
    tokens = tokenizer(captions)
    counts = {kind: sum(1 for k, _ in plan if k == kind) for kind in MIXTURE}
    return images, tokens, colours, counts


class Batches:
    """Index batches over the pool. colour_groups=0: uniform shuffles (epoch by epoch). colour_groups=k:
    every batch holds batch/k samples of each of k colours drawn at random, so within a batch most
    pairs share a colour and the loss can only be lowered by shape, size, position (harder negatives)."""

    def __init__(self, colours: np.ndarray, batch: int, colour_groups: int, seed: int) -> None:
        self.batch, self.groups = batch, colour_groups
        self.gen = torch.Generator().manual_seed(seed)
        self.colours = colours
        if colour_groups:
            found = sorted(set(colours.tolist()))
            if not 0 < colour_groups <= len(found) or batch % colour_groups:
                raise ValueError(f"colour_groups must divide the batch and be <= {len(found)} colours")
            self.members = {c: torch.from_numpy(np.flatnonzero(colours == c)) for c in found}
            self.queues = {c: self._shuffle(m) for c, m in self.members.items()}
            self.at = dict.fromkeys(found, 0)
        else:
            self.queue, self.pos = self._shuffle(torch.arange(len(colours))), 0

    def _shuffle(self, items: torch.Tensor) -> torch.Tensor:
        return items[torch.randperm(len(items), generator=self.gen)]

    def _take(self, colour: int, n: int) -> torch.Tensor:
        if self.at[colour] + n > len(self.queues[colour]):
            self.queues[colour], self.at[colour] = self._shuffle(self.members[colour]), 0
        taken = self.queues[colour][self.at[colour]:self.at[colour] + n]
        self.at[colour] += n
        return taken

    def next(self) -> torch.Tensor:
        if not self.groups:
            if self.pos + self.batch > len(self.queue):
                self.queue, self.pos = self._shuffle(torch.arange(len(self.colours))), 0
            self.pos += self.batch
            return self.queue[self.pos - self.batch:self.pos]
        keys = sorted(self.members)
        chosen = torch.randperm(len(keys), generator=self.gen)[:self.groups].tolist()
        return torch.cat([self._take(keys[i], self.batch // self.groups) for i in chosen])


# ---------------------------------------------------------------------------------------- schedule

def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup to `lr`, then cosine decay to 0 (step counts from 0)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * lr * (1 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's training convention: no weight decay on gains, biases, logit_scale (1-D params)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


# ------------------------------------------------------------------------------------------ eval

@torch.no_grad()
def _encode_images(model: torch.nn.Module, pixels: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    out = [model.encode_image(pixels[i:i + chunk]) for i in range(0, len(pixels), chunk)]
    return F.normalize(torch.cat(out).float(), dim=-1)


@torch.no_grad()
def _encode_texts(model: torch.nn.Module, tokenizer: Any, texts: list[str], chunk: int = 512) -> torch.Tensor:
    out = [model.encode_text(tokenizer(texts[i:i + chunk])) for i in range(0, len(texts), chunk)]
    return F.normalize(torch.cat(out).float(), dim=-1)


def _class_embeddings(model: torch.nn.Module, tokenizer: Any, label_set: str, labels: list[str]) -> torch.Tensor:
    """Prompt-ensembled class embeddings: mean of the normalised prompt embeddings, renormalised."""
    groups = [shapes.prompts(label_set, label) for label in labels]
    flat = _encode_texts(model, tokenizer, [p for g in groups for p in g])
    rows, at = [], 0
    for g in groups:
        rows.append(F.normalize(flat[at:at + len(g)].mean(0), dim=-1))
        at += len(g)
    return torch.stack(rows)


def _recall(sim: torch.Tensor, hit: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """sim (queries x items); hit[q, i] True where item i counts as a match for query q."""
    order = sim.argsort(dim=1, descending=True)
    ranked = torch.gather(hit, 1, order)
    return {f"R@{k}": float(ranked[:, :k].any(dim=1).float().mean()) for k in ks}


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer: Any, n_images: int = 2000, n_pairs: int = 1000,
             size: int = 64) -> dict[str, Any]:
    """Zero-shot top-1 on the heldout split for every label set, and image<->caption recall."""
    model.eval()
    mean, std, pp = _normaliser(model)
    transform = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    by_generator: dict[str, list[shapes.ShapeSample]] = {}
    embeddings: dict[str, torch.Tensor] = {}
    for kind in ("single", "pair", "count"):
        drawn = [_MAKERS[kind]("heldout", i, size) for i in range(n_images)]
        pixels = _pixels(np.stack([np.asarray(s.image) for s in drawn]), mean, std)
        if kind == "single":  # the fast path above is exactly open_clip's own eval preprocess
            reference = torch.stack([transform(s.image) for s in drawn[:8]])
            assert torch.allclose(reference, pixels[:8], atol=1e-5), "pixels differ from open_clip's preprocess"
        by_generator[kind], embeddings[kind] = drawn, _encode_images(model, pixels)

    zero_shot: dict[str, Any] = {}
    for label_set in shapes.label_sets():
        kind = _EVAL_GENERATOR.get(label_set, "single")
        drawn, image_emb = by_generator[kind], embeddings[kind]
        truth = [shapes.label_of(s, label_set) for s in drawn]
        if label_set in shapes.LABEL_SETS:
            classes = list(shapes.LABEL_SETS[label_set])
            text_emb = _class_embeddings(model, tokenizer, label_set, classes)
            pred = (image_emb @ text_emb.T).argmax(dim=1).tolist()
            right = [classes[p] == t for p, t in zip(pred, truth, strict=True)]
            entry: dict[str, Any] = {"top1": float(np.mean(right)), "classes": len(classes),
                                     "chance": 1 / len(classes), "images": len(drawn)}
            if label_set == "shape_colour":
                for big in shapes.SIZES:
                    picked = [r for r, s in zip(right, drawn, strict=True) if s.labels["size"] == big]
                    entry[f"top1_{big}"] = float(np.mean(picked))
        else:  # per-image candidates (relation): the true relation and its confusions
            per_image = [shapes.candidates(s, label_set) for s in drawn]
            unique = sorted({c for cands in per_image for c in cands})
            index = {c: i for i, c in enumerate(unique)}
            scores = image_emb @ _class_embeddings(model, tokenizer, label_set, unique).T
            right, pairwise = [], {"order": [], "binding": [], "axis": []}
            for row, (s, cands, t) in enumerate(zip(drawn, per_image, truth, strict=True)):
                sc = {c: float(scores[row, index[c]]) for c in cands}
                right.append(max(sc, key=sc.__getitem__) == t)
                first, second = s.labels["first"], s.labels["second"]
                (c1, s1), (c2, s2) = first.split(" "), second.split(" ")
                word = " above " if s.labels["axis"] == "vertical" else " left of "
                other = " left of " if word == " above " else " above "
                pairwise["order"].append(sc[t] > sc[second + word + first])
                pairwise["binding"].append(sc[t] > sc[f"{c2} {s1}{word}{c1} {s2}"])
                pairwise["axis"].append(sc[t] > sc[first + other + second])
            entry = {"top1": float(np.mean(right)), "classes": len(per_image[0]), "chance": 1 / len(per_image[0]),
                     "images": len(drawn), "per_image_candidates": True,
                     "pairwise": {k: float(np.mean(v)) for k, v in pairwise.items()}}
        zero_shot[label_set] = entry

    # Retrieval on image-caption pairs. Captions repeat ("a red circle"), so besides the strict score
    # (only the paired item counts) a caption-equivalent one counts any item with the identical caption.
    pairs = by_generator["single"][:n_pairs]
    image_emb = embeddings["single"][:n_pairs]
    captions = [s.caption for s in pairs]
    text_emb = _encode_texts(model, tokenizer, captions)
    sim = text_emb @ image_emb.T  # captions x images
    strict = torch.eye(len(pairs), dtype=torch.bool)
    same = torch.tensor([[a == b for b in captions] for a in captions])
    retrieval = {
        "pairs": len(pairs), "unique_captions": len(set(captions)),
        "text_to_image": _recall(sim, strict), "image_to_text": _recall(sim.T, strict),
        "text_to_image_caption_equivalent": _recall(sim, same),
        "image_to_text_caption_equivalent": _recall(sim.T, same),
    }
    return {"zero_shot": zero_shot, "retrieval": retrieval, "preprocess": pp}


# ------------------------------------------------------------------------------------------ train

def _versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__, "open_clip": open_clip.__version__,
             "numpy": np.__version__}
    for dist in ("pillow", "safetensors"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # pragma: no cover
            pass
    return found


def train(out: Path | str, steps: int = 2400, batch: int = 128, seed: int = 0, quiet: bool = False, *,
          lr: float = 1e-3, warmup: int = 100, weight_decay: float = 0.1, pool: int = 96000, threads: int = 2,
          eval_images: int = 2000, eval_pairs: int = 1000, log_every: int = 50, amp: str = "none",
          colour_groups: int = 0,
          config: Path = CONFIG, command: str | None = None) -> dict[str, Any]:
    """Train from scratch, evaluate on the heldout split, write DIR/model.safetensors and DIR/metrics.json;
    returns the metrics. `amp` "bf16" runs forward/backward under CPU bfloat16 autocast (FP32 master
    weights, FP32 checkpoint); "none" trains in FP32 throughout."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    say = (lambda *_: None) if quiet else (lambda msg: print(msg, flush=True))

    model, tokenizer, name = build_model(config)
    size = int(model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size)
    params = parameter_count(model)
    say(f"{name}: {params['total'] / 1e6:.2f} M parameters (visual {params['visual'] / 1e6:.2f} M, "
        f"text {params['text'] / 1e6:.2f} M of which token embedding {params['token_embedding'] / 1e6:.2f} M)")
    mean, std, _ = _normaliser(model)

    started = time.perf_counter()
    images, tokens, colours, pool_counts = render_pool(pool, size, tokenizer, quiet)
    render_seconds = time.perf_counter() - started
    say(f"pool: {len(images)} samples {pool_counts} rendered in {render_seconds:.0f}s")

    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()
    batches = Batches(colours, batch, colour_groups, seed)
    curve: list[dict[str, float]] = []
    model.train()
    t0 = time.perf_counter()
    window_loss, window_start = 0.0, t0
    loss_value = float("nan")
    for step in range(steps):
        idx = batches.next()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        pixels = _pixels(images[idx.numpy()], mean, std)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            image_features, text_features, logit_scale = model(pixels, tokens[idx])
            loss = loss_fn(image_features.float(), text_features.float(), logit_scale.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise RuntimeError(f"loss is {loss_value} at step {step}")
        window_loss += loss_value
        done = step + 1
        if done % log_every == 0 or done == steps:
            now = time.perf_counter()
            n = (done - 1) % log_every + 1
            rate = n / (now - window_start)
            eta = (steps - done) / rate if rate > 0 else 0.0
            curve.append({"step": done, "loss": window_loss / n, "lr": lr_at(step, steps, lr, warmup)})
            say(f"step {done}/{steps} loss {window_loss / n:.4f} lr {lr_at(step, steps, lr, warmup):.2e} "
                f"scale {model.logit_scale.exp().item():.1f} {rate:.2f} step/s ETA {eta / 60:.1f} min")
            window_loss, window_start = 0.0, now
    train_seconds = time.perf_counter() - t0

    model.eval()
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    weights = out / "model.safetensors"
    save_file(state, str(weights), metadata={"format": "pt", "model": name})

    say("evaluating on the heldout split")
    t1 = time.perf_counter()
    results = evaluate(model, tokenizer, n_images=eval_images, n_pairs=min(eval_pairs, eval_images), size=size)
    eval_seconds = time.perf_counter() - t1
    metrics: dict[str, Any] = {
        "model": name,
        "config": json.loads(Path(config).read_text()),
        "parameters": params,
        "checkpoint_bytes": weights.stat().st_size,
        "seed": seed, "steps": steps, "batch": batch, "lr": lr, "warmup": warmup, "weight_decay": weight_decay,
        "optimizer": "AdamW(betas=(0.9, 0.98), eps=1e-6), grad-norm clip 1.0, warmup + cosine",
        "amp": amp, "threads": threads, "colour_groups": colour_groups,
        "pool": {"samples": len(images), "by_generator": pool_counts, "split": "train"},
        "preprocess": {**results.pop("preprocess"), "source": "open_clip defaults (OpenAI CLIP mean/std)"},
        "seconds": {"render_pool": round(render_seconds, 1), "train": round(train_seconds, 1),
                    "evaluate": round(eval_seconds, 1)},
        "final_loss": curve[-1]["loss"] if curve else loss_value,
        "logit_scale": float(model.logit_scale.detach().exp()),
        "loss_curve": curve,
        "eval": {"split": "heldout", "images_per_generator": eval_images},
        **results,
        "versions": _versions(),
        "command": command,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if not quiet:
        print(summary(metrics), flush=True)
    return metrics


def summary(metrics: dict[str, Any]) -> str:
    lines = [f"{metrics['model']}: {metrics['steps']} steps x {metrics['batch']} in "
             f"{metrics['seconds']['train'] / 60:.1f} min, final loss {metrics['final_loss']:.4f}"]
    for name, entry in metrics["zero_shot"].items():
        lines.append(f"  zero-shot {name:<13} top-1 {100 * entry['top1']:5.1f} %  ({entry['classes']} classes, "
                     f"chance {100 * entry['chance']:.1f} %)")
    r = metrics["retrieval"]
    for key in ("text_to_image", "image_to_text", "text_to_image_caption_equivalent",
                "image_to_text_caption_equivalent"):
        lines.append(f"  {key:<34} R@1 {100 * r[key]['R@1']:5.1f} %  R@5 {100 * r[key]['R@5']:5.1f} %")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train_shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for model.safetensors and metrics.json")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--pool", type=int, default=96000, help="pre-rendered training samples")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-images", type=int, default=2000, help="heldout images per generator")
    parser.add_argument("--eval-pairs", type=int, default=1000, help="heldout image-caption pairs for recall")
    parser.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    parser.add_argument("--colour-groups", type=int, default=0,
                        help="draw each batch from this many colours (0: uniform batches); see Batches")
    parser.add_argument("--amp", choices=("none", "bf16"), default="none",
                        help="bf16: CPU bfloat16 autocast (measured no faster here on 2 cores)")
    parser.add_argument("--config", type=Path, default=CONFIG,
                        help="open_clip model-config JSON (default: the committed ShapesCLIP config)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    train(args.out, args.steps, args.batch, args.seed, args.quiet, lr=args.lr, warmup=args.warmup,
          weight_decay=args.weight_decay, pool=args.pool, threads=args.threads, eval_images=args.eval_images,
          eval_pairs=args.eval_pairs, amp=args.amp, log_every=args.log_every,
          colour_groups=args.colour_groups, config=args.config,
          command=" ".join(["python -m training.train_shapes", *(argv if argv is not None else sys.argv[1:])]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
