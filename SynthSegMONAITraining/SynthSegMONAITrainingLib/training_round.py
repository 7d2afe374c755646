"""A training round bounded by wall-clock time: what one short GPU window can do, start to finish.

The round reuses the training package (synthesis, network, loss, validation, export) with a
recipe made for short budgets:

- **fail fast**: in its first seconds the round synthesises a sample on the device, exports the
  starting model to the output folder, and runs a forward and backward pass (then puts the
  BatchNorm statistics back), so a broken setup costs seconds, not the window;
- **time-based schedule**: linear warm-up, then a cosine decay that reaches ``min_lr_ratio``
  when the time budget runs out (measured in seconds, not steps);
- batch size from the free device memory (CUDA), bf16 autocast and channels-last on CUDA,
  ``torch.compile`` tried with a fallback to eager;
- no host-device synchronisation inside a step, except every ``log_every`` steps (CUDA events
  time the synthesis and the step without waiting for them);
- checkpoints every ``checkpoint_every_s`` seconds and at the end: ``round.json``,
  ``metrics.csv``, ``snapshot.png`` and the float16 model as ``model.safetensors.partN`` byte
  chunks of at most 16 MiB, so a round killed at its limit still returns its latest model.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from SynthSegMONAILib import load_model, synthseg_labels
from SynthSegMONAILib.model_registry import DEFAULT_MODEL_NAME, shipped_model_dir
from SynthSegMONAILib.output_files import atomic_output

from .config import Config, from_dict
from .distributed import DistInfo, pick_device
from .export import export_model
from .label_cache import is_label_cache, load_label_cache
from .label_maps import find_label_maps, load_generation_table, load_label_map, split_maps
from .loop import TrainingError, build_loss, build_model
from .model_parts import PART_BYTES, write_parts
from .snapshot import write_snapshot
from .synthesis import Synthesizer, sample_seed
from .validation import validate_synthetic

MODEL_NAME = "model.safetensors"
ROUND_JSON = "round.json"
METRICS_CSV = "metrics.csv"
SNAPSHOT_PNG = "snapshot.png"
METRIC_FIELDS = ["step", "seconds", "samples", "loss", "lr", "samples_per_s", "synthesis_share", "val_mean_dice"]
#: largest batch the automatic choice takes: short rounds need optimiser steps more than large batches
MAX_AUTO_BATCH = 4


@dataclass
class RoundOptions:
    """Everything a round needs (the command line fills it)."""

    output_dir: str
    time_budget: float  #: seconds for the whole round, checks and final export included
    label_maps: str
    init: str = "default"  #: model file, ``default`` (the shipped default model) or ``none``
    device: str = "auto"
    crop_size: int = 160
    batch_size: int = 0  #: 0: from the free device memory (CUDA), 1 on the CPU
    lr: float = 1e-3
    min_lr_ratio: float = 0.02
    warmup_fraction: float = 0.05
    loss: str = "dice"  #: dice (SynthSeg's) or dice_ce
    compile: str = "auto"  #: auto (try on CUDA), on, off
    log_every: int = 25
    checkpoint_every_s: float = 120.0
    validation_maps: int = 2
    validation_samples: int = 4
    seed: int = -1  #: -1: drawn from the clock (each round sees new samples); recorded
    threads: int = 0
    synthesis: dict = field(default_factory=dict)  #: overrides of SynthesisConfig
    network: dict = field(default_factory=dict)  #: U-Net size for a fresh start (default: SynthSeg's)
    downsample: int = 1  #: label maps subsampled by this factor (small-scale experiments)
    channels_last: bool | None = None  #: channels-last weights and inputs (default: on CUDA)
    progress: bool = True  #: one line per log interval and checkpoint on stderr


def lr_at(fraction: float, lr: float, warmup_fraction: float, min_lr_ratio: float) -> float:
    """Learning rate when ``fraction`` of the training time has passed: warm-up, then cosine."""
    fraction = min(max(fraction, 0.0), 1.0)
    if warmup_fraction > 0 and fraction < warmup_fraction:
        return lr * max(fraction / warmup_fraction, 0.01)
    t = (fraction - warmup_fraction) / max(1.0 - warmup_fraction, 1e-9)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def default_init_model() -> Path | None:
    """Where a round starts: the shipped default model, else None (random weights)."""
    path = shipped_model_dir() / f"{DEFAULT_MODEL_NAME}.safetensors"
    return path if path.is_file() else None


def _round_config(opts: RoundOptions, network: dict) -> Config:
    c = opts.crop_size
    return from_dict({
        "data": {"label_maps": opts.label_maps, "validation_maps": opts.validation_maps},
        "synthesis": {**opts.synthesis, "crop_size": [c, c, c]},
        "network": network,
        "optim": {"lr": opts.lr, "schedule": "cosine", "min_lr_ratio": opts.min_lr_ratio},
        "training": {"synthseg_version": "2.0", "batch_size": 1,
                     "device": opts.device, "l2_warmup_steps": 0, "log_every": opts.log_every,
                     "name": DEFAULT_MODEL_NAME,
                     "description": "SynthSeg U-Net trained on synthetic images in time-bounded rounds "
                                    "(SynthSeg-MONAI)"},
        "validation": {"samples": opts.validation_samples},
    })


def _load_maps(source: str, table, device, n_validation: int, downsample: int = 1):
    if is_label_cache(source):
        maps = load_label_cache(source, table, device, downsample)
    else:
        maps = [load_label_map(f, table, device, downsample) for f in find_label_maps(source)]
    return split_maps(maps, n_validation, 0, 1)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


class _Timer:
    """Per-step timings without host-device synchronisation: CUDA events, read at log time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list[tuple] = []
        self.step_s: list[float] = []
        self.synth_s: list[float] = []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def add(self, start, synthesised, done) -> None:
        self.pending.append((start, synthesised, done))

    def collect(self) -> None:
        """Turn pending marks into seconds (call after a synchronisation)."""
        for a, b, c in self.pending:
            if self.cuda:
                self.synth_s.append(a.elapsed_time(b) / 1000)
                self.step_s.append(a.elapsed_time(c) / 1000)
            else:
                self.synth_s.append(b - a)
                self.step_s.append(c - a)
        self.pending.clear()


class TrainingRound:
    """One round; :meth:`run` returns the final ``round.json`` contents."""

    def __init__(self, opts: RoundOptions, started: float | None = None):
        self.opts = opts
        self.started = started if started is not None else time.perf_counter()
        self.out = Path(opts.output_dir)
        self.history: list[dict] = []
        self.examples: dict = {}
        self.record: dict = {}

    # -- helpers -----------------------------------------------------------------------
    def _say(self, text: str) -> None:
        if self.opts.progress:
            print(text, file=sys.stderr, flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def _to_layout(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return images.contiguous(memory_format=torch.channels_last_3d)
        return images

    def _provenance(self, steps: int, samples: int, validation: dict | None) -> dict:
        this_round = {"device": _device_name(self.device), "steps": steps, "samples": samples,
                      "minutes": round(self.elapsed() / 60, 2), "crop_size": self.opts.crop_size,
                      "batch_size": self.batch_size, "lr": self.opts.lr, "loss": self.opts.loss,
                      "seed": self.seed, "torch": torch.__version__}
        if validation:
            this_round["synthetic_validation"] = validation
        rounds = [*self.previous_rounds, this_round]
        return {"origin": "synthseg-monai training rounds", "rounds": rounds,
                "steps": sum(r["steps"] for r in rounds), "samples": sum(r["samples"] for r in rounds),
                "init": self.init_name}

    def export(self, steps: int, samples: int, validation: dict | None) -> list[dict]:
        """Write the model (float16) as byte parts in the output folder."""
        with tempfile.TemporaryDirectory(prefix=".model.", dir=self.out) as tmp:
            model_file = export_model(Path(tmp) / MODEL_NAME, self.model, self.cfg, self.labels,
                                      self._provenance(steps, samples, validation), dtype=torch.float16)
            return write_parts(model_file, self.out, MODEL_NAME, PART_BYTES)

    def write_record(self, status: str, **fields) -> dict:
        self.record.update(status=status, seconds=round(self.elapsed(), 1), **fields)
        with atomic_output(self.out / ROUND_JSON) as tmp:
            tmp.write_text(json.dumps(self.record, indent=2))
        return self.record

    def write_metrics(self) -> None:
        with atomic_output(self.out / METRICS_CSV) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, METRIC_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(self.history)

    def validate(self) -> dict:
        summary, example = validate_synthetic(self.model, self.synth, self.val_maps, self.opts.validation_samples,
                                              self.cfg.validation.seed, [self.opts.crop_size] * 3, self.labels,
                                              DistInfo(device=self.device), self.device.type == "cuda")
        if example is not None:
            self.examples["validation"] = example
        return summary

    # -- phases ------------------------------------------------------------------------
    def setup(self) -> None:
        """Device, data, model, and the fail-fast checks."""
        o = self.opts
        if o.time_budget <= 0:
            raise TrainingError("--time-budget must be positive")
        if o.compile not in ("auto", "on", "off") or o.loss not in ("dice", "dice_ce"):
            raise TrainingError("--compile must be auto, on or off; --loss dice or dice_ce")
        if o.threads > 0:
            torch.set_num_threads(o.threads)
        self.device = pick_device(o.device, 0)
        self.seed = o.seed if o.seed >= 0 else int(time.time() * 1000) % 2**31
        self.batch_size = o.batch_size or 1
        self.out.mkdir(parents=True, exist_ok=True)
        self.record = {"device": _device_name(self.device), "device_type": self.device.type,
                       "torch": torch.__version__, "time_budget_s": o.time_budget, "seed": self.seed,
                       "crop_size": o.crop_size, "loss": o.loss, "label_maps": Path(o.label_maps).name}
        self.write_record("checking")

        # starting model
        self.previous_rounds, self.init_name = [], "none"
        init = o.init
        if init == "default":
            default = default_init_model()
            init = str(default) if default else "none"
        if init != "none":
            model, info = load_model(init)
            if info.labels != synthseg_labels("2.0"):
                raise TrainingError(f"{init}: a round trains SynthSeg 2.0's 33 labels; this model has "
                                    f"{len(info.labels)}")
            self.previous_rounds = list(info.provenance.get("rounds", []))
            self.init_name = Path(init).name
            network = {k: v for k, v in info.network.to_dict().items() if k not in ("in_channels", "out_channels")}
        else:
            model, network = None, {}
        self.cfg = _round_config(o, network or {**Config().network, **o.network})
        self.table = load_generation_table("2.0")
        self.labels = self.table.target_labels
        self.train_maps, self.val_maps = _load_maps(o.label_maps, self.table, self.device, o.validation_maps,
                                                    o.downsample)
        if model is None:
            torch.manual_seed(sample_seed(self.seed, 0xC0FFEE))
            model = build_model(self.cfg, len(self.labels))
        self.model = model.to(self.device).train()
        if o.crop_size % self.model.config.size_multiple:
            raise TrainingError(f"--crop-size {o.crop_size} must be a multiple of {self.model.config.size_multiple}")
        self.channels_last = o.channels_last if o.channels_last is not None else self.device.type == "cuda"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        self.record["init"] = self.init_name
        self.record["network_parameters"] = sum(p.numel() for p in self.model.parameters())

        # check: synthesis of a sample, export before any step, forward and backward
        t = time.perf_counter()
        self.synth = Synthesizer(self.cfg.synthesis, self.table, self.device)
        image, target, _ = self.synth.sample(self.train_maps, sample_seed(self.seed, 1), [o.crop_size] * 3)
        if not bool(torch.isfinite(image).all()):
            raise TrainingError("the synthesised check sample holds non-finite values")
        self.examples["training"] = (image[0].cpu(), target[0].cpu(), target[0].cpu())
        checks = {"synthesis_s": round(time.perf_counter() - t, 3)}
        t = time.perf_counter()
        parts = self.export(0, 0, None)
        checks["export_s"] = round(time.perf_counter() - t, 3)
        self.loss_fn = build_loss(o.loss, self.cfg.training.dice_epsilon)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=o.lr)
        buffers = {k: v.clone() for k, v in self.model.named_buffers()}
        t = time.perf_counter()
        per_sample = self._trial_step(self.model, image[None], target[None])
        checks["forward_backward_s"] = round(time.perf_counter() - t, 3)
        self.batch_size = o.batch_size or self._auto_batch(per_sample)
        # the exported config says what ran
        self.cfg.training.batch_size, self.cfg.training.seed = self.batch_size, self.seed
        self.net, compile_info = self._maybe_compile(image, target)
        with torch.no_grad():
            for k, v in self.model.named_buffers():
                v.copy_(buffers[k])
        self.model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        self.validate()
        checks["validation_s"] = round(time.perf_counter() - t, 3)
        self.record.update(checks=checks, compile=compile_info, batch_size=self.batch_size,
                           model_parts=parts, training_maps=len(self.train_maps), validation_maps=len(self.val_maps))
        self.write_record("checked")
        self._say(f"checks passed in {self.elapsed():.1f} s on {self.record['device']}: batch size "
                  f"{self.batch_size}, compile {'used' if compile_info['used'] else 'not used'}, {checks}")
        self.write_metrics()
        write_snapshot(self.out / SNAPSHOT_PNG, self.examples, self.history, len(self.labels))

    def _trial_step(self, net, image: torch.Tensor, target: torch.Tensor) -> int:
        """One forward and backward pass (no optimiser step); returns its peak CUDA memory in bytes."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        with self._autocast():
            logits = net(self._to_layout(image))
        loss = self.loss_fn(logits.float(), target)
        loss.backward()
        if not bool(torch.isfinite(loss)):
            raise TrainingError(f"the check step's loss is {float(loss)}")
        self._sync()
        self.model.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - base
        return 0

    def _auto_batch(self, per_sample: int) -> int:
        if self.device.type != "cuda" or per_sample <= 0:
            return 1
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(max(1, min(MAX_AUTO_BATCH, 0.6 * free // per_sample)))

    def _maybe_compile(self, image: torch.Tensor, target: torch.Tensor):
        mode = self.opts.compile
        if mode == "off" or (mode == "auto" and self.device.type != "cuda"):
            return self.model, {"used": False, "reason": f"--compile {mode}"}
        t = time.perf_counter()
        try:
            compiled = torch.compile(self.model)
            batch = image[None].expand(self.batch_size, *image.shape).contiguous()
            targets = target[None].expand(self.batch_size, *target.shape).contiguous()
            self._trial_step(compiled, batch, targets)
        except Exception as e:  # any failure of the compiler: train eagerly
            if mode == "on":
                raise TrainingError(f"torch.compile failed: {type(e).__name__}: {e}") from e
            return self.model, {"used": False, "reason": f"{type(e).__name__}: {str(e)[:300]}",
                                "seconds": round(time.perf_counter() - t, 1)}
        return compiled, {"used": True, "seconds": round(time.perf_counter() - t, 1)}

    def train(self) -> dict:
        """Train until the budget, less the time the final validation and export need."""
        o = self.opts
        checks = self.record["checks"]
        reserve = 2 * checks["export_s"] + 1.5 * checks["validation_s"] + 5.0
        t_train = time.perf_counter()
        end = self.started + o.time_budget - reserve
        span = max(end - t_train, 1e-3)
        timer = _Timer(self.device)
        step, samples, loss_sum, n_sum = 0, 0, torch.zeros((), device=self.device), 0
        last_checkpoint, t_log, samples_log = time.perf_counter(), time.perf_counter(), 0
        final_loss = float("nan")
        while time.perf_counter() < end:
            lr = lr_at((time.perf_counter() - t_train) / span, o.lr, o.warmup_fraction, o.min_lr_ratio)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            seeds = [sample_seed(self.seed, 2, step, b) for b in range(self.batch_size)]
            m0 = timer.mark()
            images, targets = self.synth.batch(self.train_maps, seeds)
            m1 = timer.mark()
            with self._autocast():
                logits = self.net(self._to_layout(images))
            loss = self.loss_fn(logits.float(), targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            timer.add(m0, m1, timer.mark())
            loss_sum += loss.detach()
            n_sum += 1
            step += 1
            samples += self.batch_size
            if step % o.log_every == 0 or time.perf_counter() >= end:
                mean_loss = float(loss_sum) / n_sum  # the one synchronisation
                if not math.isfinite(mean_loss):
                    raise TrainingError(f"the training loss became {mean_loss} before step {step}")
                timer.collect()
                now = time.perf_counter()
                recent = timer.step_s[-n_sum:]
                self.history.append({
                    "step": step, "seconds": round(self.elapsed(), 2), "samples": samples, "loss": mean_loss,
                    "lr": lr, "samples_per_s": (samples - samples_log) / max(now - t_log, 1e-9),
                    "synthesis_share": sum(timer.synth_s[-n_sum:]) / max(sum(recent), 1e-9)})
                final_loss = mean_loss
                self._say(f"step {step}  {self.elapsed():6.0f} s  loss {mean_loss:.4f}  lr {lr:.2e}  "
                          f"{self.history[-1]['samples_per_s']:.2f} samples/s  "
                          f"synthesis {100 * self.history[-1]['synthesis_share']:.0f} %")
                loss_sum.zero_()
                n_sum, t_log, samples_log = 0, now, samples
                self.examples["training"] = (images[0, 0].detach().float().cpu(), targets[0, 0].cpu(),
                                             logits[0].argmax(0).detach().cpu())
                if now - last_checkpoint >= o.checkpoint_every_s and now < end:
                    self.checkpoint(step, samples, timer, final_loss, t_train, status="running")
                    last_checkpoint = time.perf_counter()
        self._sync()
        timer.collect()
        return self.checkpoint(step, samples, timer, final_loss, t_train, status="finished")

    def checkpoint(self, step: int, samples: int, timer: _Timer, final_loss: float, t_train: float,
                   status: str) -> dict:
        """Validate, export the model parts, and rewrite round.json, metrics.csv and the snapshot."""
        summary = self.validate()
        self.history.append({"step": step, "seconds": round(self.elapsed(), 2), "samples": samples,
                             "val_mean_dice": summary["mean_dice"]})
        validation = {"mean_dice": round(summary["mean_dice"], 4),
                      "dice": {str(k): round(v, 4) for k, v in summary["dice"].items()},
                      "samples": self.opts.validation_samples, "maps": [m.name for m in self.val_maps]}
        parts = self.export(step, samples, validation)
        train_s = time.perf_counter() - t_train
        steps_s = sorted(timer.step_s)
        record = self.write_record(
            status, steps=step, samples=samples, training_s=round(train_s, 1),
            samples_per_s=round(samples / max(train_s, 1e-9), 3),
            median_step_s=round(statistics.median(steps_s), 4) if steps_s else None,
            median_sample_s=round(statistics.median(steps_s) / self.batch_size, 4) if steps_s else None,
            synthesis_share=round(sum(timer.synth_s) / max(sum(timer.step_s), 1e-9), 3) if steps_s else None,
            final_training_loss=final_loss if math.isfinite(final_loss) else None,
            lr_schedule={"kind": "linear warm-up, then cosine to the end of the time budget",
                         "lr": self.opts.lr, "warmup_fraction": self.opts.warmup_fraction,
                         "min_lr_ratio": self.opts.min_lr_ratio, "optimizer": "adam"},
            validation=validation, model_parts=parts)
        self.write_metrics()
        write_snapshot(self.out / SNAPSHOT_PNG, self.examples, self.history, len(self.labels))
        self._say(f"checkpoint at step {step} ({status}): synthetic validation mean Dice "
                  f"{summary['mean_dice']:.3f}, model in {len(parts)} part(s)")
        return record

    def run(self) -> dict:
        self.setup()
        return self.train()


def run_round(opts: RoundOptions, started: float | None = None) -> dict:
    """Run a round (see :class:`TrainingRound`); returns ``round.json``'s contents."""
    return TrainingRound(opts, started).run()
