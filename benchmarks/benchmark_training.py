"""Training speed: synthesis time per sample and training steps per second.

    python benchmarks/benchmark_training.py --label-maps DIR [--crops 128 160] [--repeats 5]

Default settings (SynthSeg 1.0 generative model, SynthSeg U-Net 5 levels x 24 features, batch
1, soft Dice, Adam). Prints the CPU/GPU model and the median of several runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from machine import cpu_name
from monai.losses import DiceLoss

from SynthSegMONAITrainingLib.config import Config
from SynthSegMONAITrainingLib.label_maps import find_label_maps, load_generation_table, load_label_map
from SynthSegMONAITrainingLib.loop import build_model, build_optimizer
from SynthSegMONAITrainingLib.synthesis import Synthesizer, sample_seed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label-maps", required=True)
    p.add_argument("--maps", type=int, default=2, help="label maps to load")
    p.add_argument("--crops", type=int, nargs="+", default=[128, 160])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"device: {device} ({name}); CPU: {cpu_name()}; torch {torch.__version__}; "
          f"threads {torch.get_num_threads()}; CPU capability {torch.backends.cpu.get_cpu_capability()}")
    cfg = Config()
    table = load_generation_table("1.0")
    maps = [load_label_map(f, table, device) for f in find_label_maps(args.label_maps)[:args.maps]]
    autocast = device.type == "cuda" and cfg.training.bf16
    for crop in args.crops:
        cfg.synthesis.crop_size = [crop] * 3
        synth = Synthesizer(cfg.synthesis, table, device)
        synth.sample(maps, 0)
        times = []
        for i in range(args.repeats):
            _sync(device)
            t0 = time.perf_counter()
            synth.sample(maps, sample_seed(1, i))
            _sync(device)
            times.append(time.perf_counter() - t0)
        synth_s = statistics.median(times)
        torch.manual_seed(0)
        model = build_model(cfg, len(table.target_labels)).to(device)
        opt = build_optimizer(cfg, model)
        loss_fn = DiceLoss(include_background=True, to_onehot_y=True, softmax=True)
        step_times, net_times = [], []
        for i in range(args.repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            image, target = synth.batch(maps, [sample_seed(2, i)])
            _sync(device)
            t1 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(image)
            loss = loss_fn(logits.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _sync(device)
            t2 = time.perf_counter()
            if i:  # the first step warms up
                step_times.append(t2 - t0)
                net_times.append(t2 - t1)
        step_s, net_s = statistics.median(step_times), statistics.median(net_times)
        print(f"crop {crop}^3: synthesis {synth_s:.3f} s/sample; training step {step_s:.2f} s "
              f"({1 / step_s:.3f} steps/s; network fwd+bwd+update {net_s:.2f} s, synthesis "
              f"{100 * (step_s - net_s) / step_s:.0f}% of the step); median of {args.repeats}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
