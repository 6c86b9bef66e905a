"""``python -m bench.eval_speed``: FP inference speed and memory of the tiny model, and the overhead of
each method's simulated-quantized model against FP, measured side by side in one process.

What it measures:

- For each output size (256² from the demo LR images at 64², 512² from 2×2 mosaics of them at 128²):
  seconds per image of ``super_resolve`` (the full evaluation pipeline: tiling, colour fix) for the
  FP tiny model and for MinMax, PTQ4DM, PassionSR and QArtSR at ``--bits`` (default W4A4). All models
  are held in memory and timed round-robin (``--repeats`` rounds, rotated order, one untimed warm-up
  round); the figures are medians, and the overhead is median(method) / median(FP) from the same
  rounds.
- Peak memory of FP inference per size, in a child process (``ru_maxrss``; the RSS before inference,
  i.e. Python + torch + the loaded model, is reported next to it). ``--memory-only --sizes 2048``
  measures a 2048² output (LR 512², a mosaic of the demo LR images) with the shipped tiling: issue 3's
  "a 2048×1536 output fits within 8 GB on CPU" (2048² is the larger case).

The quantized models are calibrated with the smallest budgets the methods accept
(:data:`bench._common.STRUCTURE_ONLY_PARAMS`, 4 crops): their structure — and therefore their
inference cost — is the demo configuration's, their values are not (this benchmark does not measure
quality or calibration time). Targets (issue 8): MinMax/PTQ4DM/PassionSR ≤ 1.5× FP, QArtSR ≤ 2× FP.
Simulated quantization runs float kernels plus fake-quantization ops: the overhead is the price of the
simulation, not a prediction of integer-kernel speed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from bench._common import (
    METHODS,
    REPO,
    RESULTS_DIR,
    STRUCTURE_CALIBRATION,
    base_parser,
    calibration_set_for,
    current_rss_mib,
    interleaved,
    machine_info,
    median,
    met,
    peak_rss_mib,
    print_table,
    quantize_tiny,
    set_threads,
    write_results,
)

TARGETS = {"minmax": 1.5, "ptq4dm": 1.5, "passionsr": 1.5, "qartsr": 2.0}
LR_SIDES = {256: 64, 512: 128, 2048: 512}


def demo_lr_images(lr_side: int, count: int):
    """``count`` LR tensors [1, 3, lr_side, lr_side] in [0, 1] made of the demo set's LR images:
    centre crops when an image is large enough, else mosaics of consecutive images (deterministic)."""
    import torch

    from harness.datasets import get_dataset
    from harness.images import load_image, to_tensor

    pairs = list(get_dataset("demo").resolve().pairs)
    if not pairs:
        raise SystemExit("the demo dataset has no images")
    tiles = [to_tensor(load_image(p.lr_path).array) for p in pairs]
    images = []
    for index in range(count):
        canvas = torch.zeros(1, 3, lr_side, lr_side)
        y = 0
        k = index
        while y < lr_side:
            x, row_height = 0, 0
            while x < lr_side:
                tile = tiles[k % len(tiles)]
                k += 1
                h = min(tile.shape[-2], lr_side - y)
                w = min(tile.shape[-1], lr_side - x)
                top = (tile.shape[-2] - h) // 2
                left = (tile.shape[-1] - w) // 2
                canvas[..., y : y + h, x : x + w] = tile[..., top : top + h, left : left + w]
                x += w
                row_height = max(row_height, h)
            y += row_height
        images.append(canvas)
    return images


def memory_probe(size: int, images: int) -> dict:
    """Run in a child process: FP inference at ``size`` output. Reports the RSS after loading, the
    process's peak RSS (``ru_maxrss``, which loading may already have set) and the peak RSS sampled
    every 5 ms *during* inference (psutil), i.e. what inference itself needs on top of the model."""
    import threading

    import psutil
    import torch

    from harness.loaders import load_model

    torch.set_num_threads(1)
    model = load_model("tiny")
    lr_images = demo_lr_images(LR_SIDES[size], images)
    before = current_rss_mib()
    peak_before = peak_rss_mib()
    process, samples, stop = psutil.Process(), [], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(process.memory_info().rss / 2**20)
            stop.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with torch.no_grad():
            for lr in lr_images:
                model.super_resolve(lr)
    finally:
        stop.set()
        sampler.join()
    inference_peak = max(samples) if samples else None
    return {
        "rss_before_inference_mib": before,
        "peak_rss_before_inference_mib": peak_before,
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_during_inference_mib": inference_peak,
        "inference_extra_mib": None if inference_peak is None else inference_peak - before,
    }


def measure_memory(size: int, images: int) -> dict:
    command = [sys.executable, "-m", "bench.eval_speed", "--memory-probe", str(size)]
    command += ["--images", str(images)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


MEMORY_COLUMNS = [
    "output", "RSS after load (MiB)", "peak RSS during inference (MiB)", "inference extra (MiB)",
    "process peak RSS (MiB)", "note",
]  # fmt: skip


def memory_row(size, memory: dict) -> list:
    return [
        f"{size}²", memory.get("rss_before_inference_mib"),
        memory.get("peak_rss_during_inference_mib"), memory.get("inference_extra_mib"),
        memory.get("peak_rss_mib"), memory.get("error", ""),
    ]  # fmt: skip


def print_memory(rows: list) -> None:
    print_table(
        MEMORY_COLUMNS,
        rows,
        title="FP inference memory, child process (Python + torch + tiny model; the process peak "
        "includes loading)",
    )


def memory_only(args) -> int:
    machine = machine_info()
    figures = {str(size): measure_memory(size, args.images) for size in args.sizes}
    print_memory([memory_row(size, figures[str(size)]) for size in args.sizes])
    path = args.json or RESULTS_DIR / "eval_speed_memory.json"
    write_results("eval_speed", {"fp_memory": figures}, machine=machine, args=args, path=path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[256, 512], choices=sorted(LR_SIDES)
    )
    parser.add_argument("--images", type=int, default=1, help="images per size (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--bits", default="W4A4")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="only the memory probes (results: bench/results/eval_speed_memory.json)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="256² only, 1 image, 2 rounds (a smoke run)"
    )
    parser.add_argument("--memory-probe", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe is not None:
        print(json.dumps(memory_probe(args.memory_probe, args.images)))
        return 0
    if args.quick:
        args.sizes, args.images, args.repeats = [256], 1, 2
    if args.memory_only:
        return memory_only(args)

    machine = machine_info()
    machine["torch_threads"] = set_threads(args.threads)
    import torch

    from harness.loaders import load_model

    fp = load_model("tiny")
    start = time.perf_counter()
    calibration = calibration_set_for(fp, **STRUCTURE_CALIBRATION)
    setup = {"calibration_set_s": time.perf_counter() - start}
    models = {"fp": fp}
    for method in args.methods:
        qmodel, seconds = quantize_tiny(method, args.bits, calibration)
        models[method] = qmodel
        setup[f"quantize_{method}_s"] = seconds
    figures: dict = {"bits": args.bits, "setup_seconds": setup, "sizes": {}}
    rows = []
    for size in args.sizes:
        lr_images = demo_lr_images(LR_SIDES[size], args.images)

        def runner(model, images=lr_images):
            def run():
                with torch.no_grad():
                    for lr in images:
                        model.super_resolve(lr)

            return run

        times = interleaved({name: runner(m) for name, m in models.items()}, args.repeats)
        per_image = {name: median(t) / len(lr_images) for name, t in times.items()}
        entry = {
            "lr_side": LR_SIDES[size],
            "images": len(lr_images),
            "repeats": args.repeats,
            "seconds_per_round": times,
            "seconds_per_image": per_image,
            "images_per_second": {name: 1.0 / s for name, s in per_image.items()},
            "overhead_vs_fp": {},
        }
        if not args.no_memory:
            entry["fp_memory"] = measure_memory(size, len(lr_images))
        for name in models:
            ratio = per_image[name] / per_image["fp"]
            target = TARGETS.get(name)
            if name != "fp":
                entry["overhead_vs_fp"][name] = {
                    "ratio": ratio,
                    "target": target,
                    "verdict": met(ratio, target),
                }
            rows.append([
                f"{size}²", name, per_image[name], 1.0 / per_image[name], ratio,
                "" if target is None else f"<= {target}", "" if target is None else met(ratio, target),
            ])  # fmt: skip
        figures["sizes"][str(size)] = entry
    print_table(
        ["output", "model", "s/image", "images/s", "x FP", "target", "verdict"],
        rows,
        title=f"eval_speed: tiny model, {args.bits} simulated quantization, "
        f"median of {args.repeats} interleaved rounds ({args.threads} torch thread(s))",
    )
    if not args.no_memory:
        mem_rows = []
        for size, entry in figures["sizes"].items():
            memory = entry.get("fp_memory", {})
            mem_rows.append([
                f"{size}²", memory.get("rss_before_inference_mib"),
                memory.get("peak_rss_before_inference_mib"), memory.get("peak_rss_mib"),
                memory.get("error", ""),
            ])  # fmt: skip
        print_table(
            [
                "output",
                "RSS after load (MiB)",
                "peak RSS after load (MiB)",
                "peak RSS (MiB)",
                "note",
            ],
            mem_rows,
            title="FP inference memory (child process: Python + torch + tiny model + inference)",
        )
    write_results("eval_speed", figures, machine=machine, args=args, path=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["demo_lr_images", "main", "memory_probe"]
