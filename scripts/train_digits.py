#!/usr/bin/env python
"""Train the demo model ``digits_perceiver_t32`` (or another registry model) on the handwritten-digits demo split.

Recipe (the Dyn-Perceiver paper's, at toy scale): cross-entropy on every exit with the
official loss weights (CNN 0.25, latent exits 0.25 each, merge 0.5) plus self-distillation of
the three earlier exits from the last one (KL to softmax(y_merge / T), T = 4, weight 0.5,
teacher detached); AdamW with a cosine schedule; random shifts of up to 3 pixels. Fixed seed,
CPU, deterministic algorithms, a fixed thread count (the same seed and thread count give
the same weights).

Writes ``edgeperceiver/models/weights/digits_perceiver_t32.pth`` in the official training
checkpoint format (``model`` in fp16, ``args`` Namespace, ``epoch``) plus ``metrics``: the
per-exit held-out accuracy of the weights as written (after the fp16 round trip).

    .venv/bin/python scripts/train_digits.py            # ~2-4 minutes on 2 cores

``--model reg800m_perceiver_t128 --size 224 --out FILE`` trains a full-size architecture on
the same digits (10 classes, images drawn at 224x224): a trained model of the size users
deploy, for measurements whose accuracy gates untrained weights cannot pass (about 2.5
minutes per epoch at batch 32 on 2 cores).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeperceiver.datasets import load_digits_split, to_model_input  # noqa: E402
from edgeperceiver.models import EXIT_NAMES, create_model, get_spec  # noqa: E402

MODEL = "digits_perceiver_t32"
DEFAULT_OUT = ROOT / "edgeperceiver" / "models" / "weights" / f"{MODEL}.pth"
WHITE = 255


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=MODEL, help="registry model (its classes become the 10 digits)")
    p.add_argument("--size", type=int, default=None, help="image size (default: the model's input size)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=int, default=2)
    p.add_argument("--max-shift", type=int, default=3, help="random shift in pixels (white padding)")
    p.add_argument("--T-kd", type=float, default=4.0, help="distillation temperature")
    p.add_argument("--alpha-kd", type=float, default=0.5, help="distillation weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: deterministic, and fastest on a shared machine)"
    )
    p.add_argument("--out", type=Path, default=None, help=f"checkpoint to write (default for {MODEL}: {DEFAULT_OUT})")
    p.add_argument("--fp32", action="store_true", help="store fp32 weights (default: fp16)")
    return p.parse_args(argv)


def shift_batch(images: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation of uint8 NHWC images by up to ``max_shift`` pixels (white fill)."""
    if max_shift == 0:
        return images
    n, h, w, _ = images.shape
    padded = F.pad(images.permute(0, 3, 1, 2), (max_shift,) * 4, value=WHITE).permute(0, 2, 3, 1)
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    return torch.stack([padded[i, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offs.tolist())])


def exit_losses(outs: tuple[torch.Tensor, ...], y: torch.Tensor, T: float, alpha: float) -> torch.Tensor:
    """Official weights: 0.25 CNN, 0.25 each latent exit, 0.5 merge; KD of exits 1-3 from exit 4."""
    y_early3, y_att, y_cnn, y_merge = outs
    ce = 0.25 * F.cross_entropy(y_cnn, y) + 0.25 * (F.cross_entropy(y_att, y) + F.cross_entropy(y_early3, y))
    ce = ce + 0.5 * F.cross_entropy(y_merge, y)
    teacher = F.softmax(y_merge.detach() / T, dim=1)
    kd = sum(
        F.kl_div(F.log_softmax(s / T, dim=1), teacher, reduction="batchmean") * T * T for s in (y_early3, y_att, y_cnn)
    )
    return ce + alpha * kd


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Per-exit accuracy (eval mode)."""
    model.eval()
    correct = torch.zeros(4)
    for i in range(0, len(x), 256):
        outs = model(x[i : i + 256])
        for k, o in enumerate(outs):
            correct[k] += (o.argmax(1) == y[i : i + 256]).sum()
    return {name: float(c) / len(x) for name, c in zip(EXIT_NAMES, correct, strict=True)}


def main(argv: list[str] | None = None) -> dict[str, float]:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    torch.use_deterministic_algorithms(True)
    if a.out is None:
        if a.model != MODEL:
            raise SystemExit(f"--out is required for --model {a.model}")
        a.out = DEFAULT_OUT
    spec = get_spec(a.model)
    classes = 10
    cfg = spec.config(num_classes=classes)
    size = a.size or cfg.input_size
    data = load_digits_split(size)
    model = create_model(a.model, num_classes=classes)
    x_train_u8 = torch.from_numpy(data.x_train)
    y_train = torch.from_numpy(data.y_train)
    x_held = torch.from_numpy(to_model_input(data.x_heldout, spec.mean, spec.std))
    y_held = torch.from_numpy(data.y_heldout)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)

    steps_per_epoch = len(x_train_u8) // a.batch_size
    total = a.epochs * steps_per_epoch
    warm = a.warmup_epochs * steps_per_epoch
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for n, p in model.named_parameters():
        (no_decay if p.dim() <= 1 or n.endswith(("latent", "relative_position_bias")) else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=a.lr
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
    )
    gen = torch.Generator().manual_seed(a.seed)
    t0 = time.time()
    for epoch in range(a.epochs):
        model.train()
        perm = torch.randperm(len(x_train_u8), generator=gen)
        running = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * a.batch_size : (s + 1) * a.batch_size]
            imgs = shift_batch(x_train_u8[idx], a.max_shift, gen)
            x = (imgs.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
            loss = exit_losses(model(x), y_train[idx], a.T_kd, a.alpha_kd)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach())
        if epoch % 5 == 4 or epoch == a.epochs - 1:
            acc = evaluate(model, x_held, y_held)
            accs = " ".join(f"{k}={v:.3f}" for k, v in acc.items())
            print(
                f"epoch {epoch + 1:3d} loss {running / steps_per_epoch:.4f} held-out {accs} ({time.time() - t0:.0f}s)"
            )

    dtype = torch.float32 if a.fp32 else torch.float16
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() for k, v in sd.items()})  # evaluate what is shipped
    metrics = evaluate(model, x_held, y_held)
    args_ns = argparse.Namespace(
        model=a.model,
        input_size=size,
        nb_classes=cfg.num_classes,
        depth_factor=list(cfg.depth_factor),
        spatial_reduction=cfg.spatial_reduction,
        with_last_CA=cfg.with_last_CA,
        SA_widening_factor=cfg.SA_widening_factor,
        with_x2z=cfg.with_x2z,
        with_dwc=cfg.with_dwc,
        with_z2x=cfg.with_z2x,
        with_isc=cfg.with_isc,
        num_latent_channels=cfg.num_latent_channels,
        num_SA_heads=list(cfg.num_SA_heads),
        dropout=cfg.dropout,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        weight_decay=a.weight_decay,
        T_kd=a.T_kd,
        alpha_kd=a.alpha_kd,
        seed=a.seed,
        threads=a.threads,
        data_set="sklearn-digits-32px-heldout0.3-seed0",
    )
    ckpt: dict[str, Any] = {"model": sd, "args": args_ns, "epoch": a.epochs - 1, "metrics": metrics}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()  # serialise in memory: the archive's inner name never depends on a temp name
    torch.save(ckpt, buf)
    fd, tmp = tempfile.mkstemp(prefix=f".{a.out.name}.", dir=a.out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(buf.getvalue())
        os.replace(tmp, a.out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e6:.2f} MB) in {time.time() - t0:.0f}s")
    print("held-out accuracy per exit (shipped weights): " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return metrics


if __name__ == "__main__":
    main()
