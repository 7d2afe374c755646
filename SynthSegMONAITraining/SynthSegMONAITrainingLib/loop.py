"""The training loop: synthesis on the device, SynthSeg U-Net, soft Dice, DDP, validation.

Files written by rank 0 in the output folder: ``config.yaml``, ``checkpoint.pt`` (atomic, for
``--resume``), ``metrics.jsonl`` and ``metrics.csv``, ``snapshot.png``, ``best.safetensors``
(best validation mean Dice), ``last.safetensors`` and ``summary.json``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from monai.losses import DiceCELoss, DiceLoss
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from SynthSegMONAILib.network import SynthSegUNet, UNetConfig

from . import distributed as ddp
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import Config, save_config
from .export import export_model
from .label_cache import is_label_cache, load_label_cache
from .label_maps import (
    LabelMapError,
    find_label_maps,
    load_generation_table,
    load_label_map,
    split_maps,
)
from .snapshot import write_snapshot
from .synthesis import Synthesizer, sample_seed
from .validation import load_real_cases, validate_real, validate_synthetic

METRIC_FIELDS = ["step", "loss", "lr", "steps_per_s", "synthesis_s", "val_mean_dice", "real_mean_dice"]


class TrainingError(RuntimeError):
    """Training cannot start or continue; the message says why."""


def build_model(cfg: Config, n_labels: int) -> SynthSegUNet:
    """The engine's SynthSeg U-Net sized by ``cfg.network`` with one output per label."""
    net = dict(cfg.network)
    net["out_channels"] = n_labels
    return SynthSegUNet(UNetConfig.from_dict(net))


def lr_factor(cfg: Config):
    """Learning-rate multiplier per step: linear warm-up, then the configured schedule."""
    o, total = cfg.optim, cfg.training.steps

    def factor(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        span = max(total - o.warmup_steps, 1)
        t = min(max(step - o.warmup_steps, 0) / span, 1.0)
        m = o.min_lr_ratio
        if o.schedule == "linear":
            return 1 - (1 - m) * t
        if o.schedule == "cosine":
            return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * t))
        return m + (1 - m) * (1 - t) ** o.poly_power

    return factor


def build_loss(name: str = "dice", epsilon: float = 1e-7) -> torch.nn.Module:
    """Soft Dice over every channel (SynthSeg's loss) or Dice plus cross-entropy, on logits."""
    if name == "dice":
        return DiceLoss(include_background=True, to_onehot_y=True, softmax=True,
                        smooth_nr=epsilon, smooth_dr=epsilon)
    if name == "dice_ce":
        return DiceCELoss(include_background=True, to_onehot_y=True, softmax=True,
                          smooth_nr=epsilon, smooth_dr=epsilon)
    raise ValueError(f"unknown loss {name!r} (dice or dice_ce)")


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam or AdamW as configured."""
    o = cfg.optim
    cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


class MetricsLog:
    """``metrics.jsonl`` and ``metrics.csv``, rewritten from the history when a run resumes."""

    def __init__(self, folder: Path, history: list[dict]):
        self.jsonl, self.csv = folder / "metrics.jsonl", folder / "metrics.csv"
        with open(self.jsonl, "w") as f:
            for h in history:
                f.write(json.dumps(h) + "\n")
        with open(self.csv, "w", newline="") as f:
            w = csv.DictWriter(f, METRIC_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(history)

    def append(self, row: dict) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.DictWriter(f, METRIC_FIELDS, extrasaction="ignore").writerow(row)


def _load_maps(cfg: Config, table, info: ddp.DistInfo):
    if is_label_cache(cfg.data.label_maps):
        maps = load_label_cache(cfg.data.label_maps, table, info.device, cfg.data.downsample)
        return split_maps(maps, cfg.data.validation_maps, info.rank, info.world_size)
    files = find_label_maps(cfg.data.label_maps)
    train_files, val_files = split_maps(files, cfg.data.validation_maps, info.rank, info.world_size)
    load = [load_label_map(f, table, info.device, cfg.data.downsample, cfg.data.margin) for f in train_files]
    val = [load_label_map(f, table, info.device, cfg.data.downsample, cfg.data.margin) for f in val_files]
    return load, val


def train(cfg: Config, output_dir: str | Path, resume: bool = False, info: ddp.DistInfo | None = None,
          progress: bool = True) -> dict:
    """Run (or resume) training; returns the summary rank 0 writes to ``summary.json``."""
    out = Path(output_dir)
    info = info or ddp.DistInfo(device=ddp.pick_device(cfg.training.device, 0))
    t_cfg, v_cfg = cfg.training, cfg.validation
    if t_cfg.threads > 0:
        torch.set_num_threads(t_cfg.threads)
    ckpt_path = out / CHECKPOINT_NAME
    if resume and not ckpt_path.is_file():
        raise TrainingError(f"--resume: no {CHECKPOINT_NAME} in {out}")
    if not resume and ckpt_path.is_file():
        raise TrainingError(f"{out} already holds a training run: use --resume, or another output folder")

    table = load_generation_table(t_cfg.synthseg_version, cfg.data.generation_table or None)
    labels = table.target_labels
    error = None
    try:
        train_maps, val_maps = _load_maps(cfg, table, info)
    except (LabelMapError, FileNotFoundError) as e:
        error = e
    if not ddp.all_ok(error is None, info):
        raise TrainingError(str(error) if error else "another process could not load its label maps")
    real_cases = []
    if v_cfg.real_images:
        real_cases = load_real_cases(v_cfg.real_images, v_cfg.real_image_name, v_cfg.real_label_name,
                                     labels, v_cfg.real_max_subjects)

    synth = Synthesizer(cfg.synthesis, table, info.device)
    torch.manual_seed(sample_seed(t_cfg.seed, 0xC0FFEE))  # same initial weights on every rank and run
    model = build_model(cfg, len(labels)).to(info.device)
    multiple = model.config.size_multiple
    crop = list(cfg.synthesis.crop_size)
    val_crop = list(v_cfg.crop_size or crop)
    for name, c in (("synthesis.crop_size", crop), ("validation.crop_size", val_crop)):
        if any(s % multiple for s in c):
            raise TrainingError(f"{name} {c} must be multiples of {multiple} for a {model.config.levels}-level U-Net")
    if t_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    start, history, best, best_step = 0, [], -1.0, -1
    if resume:
        state = load_checkpoint(ckpt_path, info.device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start, history = state["step"], state["history"]
        best, best_step = state["best_mean_dice"], state["best_step"]
        if start >= t_cfg.steps:
            raise TrainingError(f"the checkpoint is at step {start}: nothing left to do for "
                                f"training.steps = {t_cfg.steps} (raise --steps to continue)")
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        log = MetricsLog(out, history)
    ddp.barrier(info)

    net = model
    if info.distributed:
        net = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    autocast = t_cfg.bf16 and info.device.type == "cuda"
    dice_loss = build_loss("dice", t_cfg.dice_epsilon)
    bar = tqdm(total=t_cfg.steps, initial=start, disable=not (info.is_main and progress), mininterval=1.0,
               desc="training", unit="step")
    examples: dict = {}
    loss_sum, n_loss, synth_time, t_last, step_last = 0.0, 0, 0.0, time.perf_counter(), start
    t_begin = time.perf_counter()
    for step in range(start, t_cfg.steps):
        t0 = time.perf_counter()
        seeds = [sample_seed(t_cfg.seed, info.rank, step, b) for b in range(t_cfg.batch_size)]
        images, targets = synth.batch(train_maps, seeds)
        synth_time += time.perf_counter() - t0
        if t_cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = net(images)
        logits = logits.float()
        if step < t_cfg.l2_warmup_steps:
            onehot = F.one_hot(targets[:, 0], len(labels)).movedim(-1, 1).float()
            loss = F.mse_loss(logits, 10 * onehot - 5)
        else:
            loss = dice_loss(logits, targets)
        if not torch.isfinite(loss):
            raise TrainingError(f"the loss became {loss.item()} at step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        loss_sum += loss.item()
        n_loss += 1
        done = step + 1
        bar.update(1)
        if done % t_cfg.log_every == 0 or done == t_cfg.steps:
            mean_loss = float(ddp.all_reduce_mean(torch.tensor([loss_sum / n_loss], device=info.device), info))
            now = time.perf_counter()
            row = {"step": done, "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                   "steps_per_s": (done - step_last) / max(now - t_last, 1e-9),
                   "synthesis_s": synth_time / max(done - step_last, 1)}
            history.append(row)
            if info.is_main:
                log.append(row)
                bar.set_postfix(loss=f"{mean_loss:.4f}", steps_s=f"{row['steps_per_s']:.2f}")
            loss_sum, n_loss, synth_time, t_last, step_last = 0.0, 0, 0.0, now, done
            examples["training"] = (images[0, 0].detach().cpu(), targets[0, 0].cpu(),
                                    logits[0].argmax(0).detach().cpu())
        validate_now = done % v_cfg.every == 0 or done == t_cfg.steps
        if validate_now or done % t_cfg.checkpoint_every == 0:
            ddp.average_buffers(model, info)
        if validate_now and (val_maps and v_cfg.samples or real_cases):
            row = {"step": done}
            if val_maps and v_cfg.samples:
                summary, example = validate_synthetic(model, synth, val_maps, v_cfg.samples, v_cfg.seed, val_crop,
                                                      labels, info, autocast)
                row.update(val_mean_dice=summary["mean_dice"], val_dice=summary["dice"])
                if example is not None:
                    examples["validation"] = example
            if real_cases:
                real = validate_real(model, real_cases, val_crop, labels, info, autocast)
                row.update(real_mean_dice=real["mean_dice"], real_dice=real["dice"])
            score = row.get("val_mean_dice", row.get("real_mean_dice", 0.0))
            history.append(row)
            if score > best:
                best, best_step = score, done
                if info.is_main:
                    export_model(out / "best.safetensors", model, cfg, labels,
                                 _provenance(cfg, info, done, row, t_begin, start))
            if info.is_main:
                log.append(row)
                if v_cfg.snapshot:
                    write_snapshot(out / "snapshot.png", examples, history, len(labels))
        if done % t_cfg.checkpoint_every == 0 or done == t_cfg.steps:
            if info.is_main:
                save_checkpoint(ckpt_path, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": done, "rng": rng_state(),
                    "history": history, "best_mean_dice": best, "best_step": best_step,
                    "config": cfg.to_dict(), "world_size": info.world_size})
            ddp.barrier(info)
    bar.close()
    ddp.average_buffers(model, info)
    last_val = next((h for h in reversed(history) if "val_mean_dice" in h or "real_mean_dice" in h), {})
    checksums = ddp.gather_objects(state_checksum(model), info)
    shares = ddp.gather_objects([m.name for m in train_maps], info)
    if len(set(checksums)) > 1 and info.is_main:
        print("warning: the processes ended with different weights", file=sys.stderr)
    summary = {"steps": t_cfg.steps, "started_at_step": start, "best_mean_dice": best, "best_step": best_step,
               "last_validation": {k: v for k, v in last_val.items() if not isinstance(v, dict)},
               "world_size": info.world_size, "device": str(info.device),
               "seconds": time.perf_counter() - t_begin, "weights_sha256_per_rank": checksums,
               "label_maps_per_rank": shares, "validation_maps": [m.name for m in val_maps]}
    if info.is_main:
        export_model(out / "last.safetensors", model, cfg, labels,
                     _provenance(cfg, info, t_cfg.steps, last_val, t_begin, start))
        if best_step < 0:
            export_model(out / "best.safetensors", model, cfg, labels,
                         _provenance(cfg, info, t_cfg.steps, last_val, t_begin, start))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    ddp.barrier(info)
    return summary


def state_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer (to check that the ranks agree)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _provenance(cfg: Config, info: ddp.DistInfo, step: int, validation: dict, t_begin: float, start: int) -> dict:
    dev = info.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    return {"steps": step, "validation": validation, "world_size": info.world_size,
            "batch_size_per_process": cfg.training.batch_size, "device": name,
            "device_seconds_this_session": round((time.perf_counter() - t_begin) * info.world_size, 1),
            "resumed_from_step": start, "torch": torch.__version__}
