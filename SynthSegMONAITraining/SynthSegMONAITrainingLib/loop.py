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

from SynthSegMONAILib import SynthSegUNet, UNetConfig

from . import distributed as ddp
from .checkpoint import CHECKPOINT_NAME
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
from .train_state import TrainState
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


class _LogWindow:
    """Loss and timings summed since the last training row of the metrics."""

    def __init__(self, step: int):
        self._restart(step, time.perf_counter())

    def _restart(self, step: int, now: float) -> None:
        self.step, self.time = step, now
        self.loss_sum, self.losses, self.synthesis_s = 0.0, 0, 0.0

    def add(self, loss: float, synthesis_s: float) -> None:
        self.loss_sum += loss
        self.losses += 1
        self.synthesis_s += synthesis_s

    def row(self, done: int, mean_loss: float, lr: float) -> dict:
        """The metrics row at step ``done``; the window then starts again from there."""
        now = time.perf_counter()
        row = {"step": done, "loss": mean_loss, "lr": lr,
               "steps_per_s": (done - self.step) / max(now - self.time, 1e-9),
               "synthesis_s": self.synthesis_s / max(done - self.step, 1)}
        self._restart(done, now)
        return row


class _Run:
    """One training run (or its resumption): set up in the constructor, then driven by :func:`train`
    one step at a time; each method is one part of a step (see :func:`train`)."""

    def __init__(self, cfg: Config, out: Path, resume: bool, info: ddp.DistInfo, progress: bool):
        self.cfg, self.out, self.info = cfg, out, info
        if cfg.training.threads > 0:
            torch.set_num_threads(cfg.training.threads)
        self.ckpt_path = out / CHECKPOINT_NAME
        if resume and not self.ckpt_path.is_file():
            raise TrainingError(f"--resume: no {CHECKPOINT_NAME} in {out}")
        if not resume and self.ckpt_path.is_file():
            raise TrainingError(f"{out} already holds a training run: use --resume, or another output folder")
        self._load_data()
        self._build_network()
        self.state = self.restore() if resume else TrainState()
        self.start = self.state.step
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
            self.metrics = MetricsLog(out, self.state.history)
        ddp.barrier(info)
        self._prepare_steps(progress)

    def _load_data(self) -> None:
        """The generation table, this process's share of the label maps, the real validation cases."""
        cfg, info, v_cfg = self.cfg, self.info, self.cfg.validation
        table = load_generation_table(cfg.training.synthseg_version, cfg.data.generation_table or None)
        self.labels = table.target_labels
        error = None
        try:
            self.train_maps, self.val_maps = _load_maps(cfg, table, info)
        except (LabelMapError, FileNotFoundError) as e:
            error = e
        if not ddp.all_ok(error is None, info):
            raise TrainingError(str(error) if error else "another process could not load its label maps")
        self.real_cases = []
        if v_cfg.real_images:
            self.real_cases = load_real_cases(v_cfg.real_images, v_cfg.real_image_name, v_cfg.real_label_name,
                                              v_cfg.real_max_subjects)
        self.synth = Synthesizer(cfg.synthesis, table, info.device)

    def _build_network(self) -> None:
        """The U-Net (same initial weights on every process and run), its optimiser and schedule."""
        cfg = self.cfg
        torch.manual_seed(sample_seed(cfg.training.seed, 0xC0FFEE))
        model = build_model(cfg, len(self.labels)).to(self.info.device)
        multiple = model.config.size_multiple
        crop = list(cfg.synthesis.crop_size)
        self.val_crop = list(cfg.validation.crop_size or crop)
        for name, c in (("synthesis.crop_size", crop), ("validation.crop_size", self.val_crop)):
            if any(s % multiple for s in c):
                raise TrainingError(f"{name} {c} must be multiples of {multiple} for a {model.config.levels}-level U-Net")
        if cfg.training.channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        self.model = model
        self.optimizer = build_optimizer(cfg, model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg))

    def _prepare_steps(self, progress: bool) -> None:
        """What the steps use: the network (wrapped by DDP across processes), the loss, the bar."""
        t_cfg, info = self.cfg.training, self.info
        self.net = self.model
        if info.distributed:
            self.net = DistributedDataParallel(
                self.model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
        self.autocast = t_cfg.bf16 and info.device.type == "cuda"
        self.dice_loss = build_loss("dice", t_cfg.dice_epsilon)
        self.bar = tqdm(total=t_cfg.steps, initial=self.start, disable=not (info.is_main and progress),
                        mininterval=1.0, desc="training", unit="step")
        self.examples: dict = {}
        self.window = _LogWindow(self.start)
        self.t_begin = time.perf_counter()
        self.last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # images, targets, logits

    def restore(self) -> TrainState:
        """The state of the checkpoint, loaded into the model, optimiser, scheduler and random states."""
        state = TrainState.restore(self.ckpt_path, self.model, self.optimizer, self.scheduler, self.info.device)
        steps = self.cfg.training.steps
        if state.step >= steps:
            raise TrainingError(f"the checkpoint is at step {state.step}: nothing left to do for "
                                f"training.steps = {steps} (raise --steps to continue)")
        return state

    def step(self) -> None:
        """One optimisation step on a freshly synthesised batch."""
        t_cfg, info, step = self.cfg.training, self.info, self.state.step
        t0 = time.perf_counter()
        seeds = [sample_seed(t_cfg.seed, info.rank, step, b) for b in range(t_cfg.batch_size)]
        images, targets = self.synth.batch(self.train_maps, seeds)
        synthesis_s = time.perf_counter() - t0
        if t_cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.net(images)
        logits = logits.float()
        if step < t_cfg.l2_warmup_steps:
            onehot = F.one_hot(targets[:, 0], len(self.labels)).movedim(-1, 1).float()
            loss = F.mse_loss(logits, 10 * onehot - 5)
        else:
            loss = self.dice_loss(logits, targets)
        if not torch.isfinite(loss):
            raise TrainingError(f"the loss became {loss.item()} at step {step + 1}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.window.add(loss.item(), synthesis_s)
        self.state.step = step + 1
        self.last = (images, targets, logits)
        self.bar.update(1)

    def log(self) -> None:
        """A training row of the metrics: the loss averaged over the steps and the processes."""
        window, info = self.window, self.info
        mean = torch.tensor([window.loss_sum / window.losses], device=info.device)
        mean_loss = float(ddp.all_reduce_mean(mean, info))
        row = window.row(self.state.step, mean_loss, self.scheduler.get_last_lr()[0])
        self.state.history.append(row)
        if info.is_main:
            self.metrics.append(row)
            self.bar.set_postfix(loss=f"{mean_loss:.4f}", steps_s=f"{row['steps_per_s']:.2f}")
        images, targets, logits = self.last
        self.examples["training"] = (images[0, 0].detach().cpu(), targets[0, 0].cpu(),
                                     logits[0].argmax(0).detach().cpu())

    def validate(self) -> None:
        """Validation rows (synthetic and real images); a better score exports ``best.safetensors``."""
        v_cfg, info, done = self.cfg.validation, self.info, self.state.step
        row = {"step": done}
        if self.val_maps and v_cfg.samples:
            summary, example = validate_synthetic(self.model, self.synth, self.val_maps, v_cfg.samples, v_cfg.seed,
                                                  self.val_crop, self.labels, info, self.autocast)
            row.update(val_mean_dice=summary["mean_dice"], val_dice=summary["dice"])
            if example is not None:
                self.examples["validation"] = example
        if self.real_cases:
            real = validate_real(self.model, self.real_cases, self.labels, info)
            row.update(real_mean_dice=real["mean_dice"], real_dice=real["dice"])
        score = row.get("val_mean_dice", row.get("real_mean_dice", 0.0))
        self.state.history.append(row)
        if self.state.improved(score, done) and info.is_main:
            self.export("best.safetensors", done, row)
        if info.is_main:
            self.metrics.append(row)
            if v_cfg.snapshot:
                write_snapshot(self.out / "snapshot.png", self.examples, self.state.history, len(self.labels))

    def checkpoint(self) -> None:
        """``checkpoint.pt`` (rank 0), then every process waits for it."""
        if self.info.is_main:
            self.state.save(self.ckpt_path, self.model, self.optimizer, self.scheduler, self.cfg.to_dict(),
                            self.info.world_size)
        ddp.barrier(self.info)

    def export(self, name: str, step: int, validation: dict) -> None:
        """Write the model as an engine model file in the output folder (rank 0 only)."""
        export_model(self.out / name, self.model, self.cfg, self.labels,
                     _provenance(self.cfg, self.info, step, validation, self.t_begin, self.start))

    def finish(self) -> dict:
        """Final models and ``summary.json``; returns the summary."""
        cfg, info, state = self.cfg, self.info, self.state
        self.bar.close()
        ddp.average_buffers(self.model, info)
        last_val = next((h for h in reversed(state.history) if "val_mean_dice" in h or "real_mean_dice" in h), {})
        checksums = ddp.gather_objects(state_checksum(self.model), info)
        shares = ddp.gather_objects([m.name for m in self.train_maps], info)
        if len(set(checksums)) > 1 and info.is_main:
            print("warning: the processes ended with different weights", file=sys.stderr)
        summary = {"steps": cfg.training.steps, "started_at_step": self.start,
                   "best_mean_dice": state.best_mean_dice, "best_step": state.best_step,
                   "last_validation": {k: v for k, v in last_val.items() if not isinstance(v, dict)},
                   "world_size": info.world_size, "device": str(info.device),
                   "seconds": time.perf_counter() - self.t_begin, "weights_sha256_per_rank": checksums,
                   "label_maps_per_rank": shares, "validation_maps": [m.name for m in self.val_maps]}
        if info.is_main:
            self.export("last.safetensors", cfg.training.steps, last_val)
            if state.best_step < 0:
                self.export("best.safetensors", cfg.training.steps, last_val)
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        ddp.barrier(info)
        return summary


def train(cfg: Config, output_dir: str | Path, resume: bool = False, info: ddp.DistInfo | None = None,
          progress: bool = True) -> dict:
    """Run (or resume) training; returns the summary rank 0 writes to ``summary.json``.

    Set up (or restore from ``checkpoint.pt``), then for each step: one optimisation step, a
    metrics row every ``training.log_every`` steps, validation every ``validation.every`` steps
    (the BatchNorm statistics averaged over the processes first), a checkpoint every
    ``training.checkpoint_every`` steps; the last step does all three. Finally the models and
    the summary are written.
    """
    info = info or ddp.DistInfo(device=ddp.pick_device(cfg.training.device, 0))
    run = _Run(cfg, Path(output_dir), resume, info, progress)
    t_cfg, v_cfg = cfg.training, cfg.validation
    while run.state.step < t_cfg.steps:
        run.step()
        done = run.state.step
        last = done == t_cfg.steps
        if done % t_cfg.log_every == 0 or last:
            run.log()
        validate_now = done % v_cfg.every == 0 or last
        if validate_now or done % t_cfg.checkpoint_every == 0:
            ddp.average_buffers(run.model, info)
        if validate_now and (run.val_maps and v_cfg.samples or run.real_cases):
            run.validate()
        if done % t_cfg.checkpoint_every == 0 or last:
            run.checkpoint()
    return run.finish()


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
