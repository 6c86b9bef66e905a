"""``python -m bench.vae_reconstruction``: how well a VAE reconstructs a dataset's HR images.

The VAE's reconstruction bounds a one-step SR model's fidelity (docs/model.md): the decoder can at
best return what the encoder kept. This encodes every HR image of ``--dataset`` with the VAE of
``--vae`` (a diffusers ``AutoencoderKL`` directory, e.g. ``harness/assets/tiny/vae`` — the shipped
model's encoder carries the stage-3 LoRA — or ``WORK/work/base_model/vae`` of a ``qbench train-tiny``
run, the stage-1 VAE), takes the posterior mode (or a seeded sample with ``--sample``), decodes,
clamps to [0, 1] and scores the result against the HR image with the same metric code as ``qbench
eval`` (Y-PSNR and SSIM as the papers compute them, docs/metrics.md). No colour fix, no tiling: the
whole HR image goes through at once.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bench._common import REPO, base_parser, machine_info, print_table, write_results

METRICS = ("psnr", "ssim")


def reconstruct(vae, hr01, *, sample_seed: int | None = None):
    """``decode(encode(hr))`` in [0, 1]: posterior mode, or a sample seeded with ``sample_seed``."""
    import torch

    with torch.no_grad():
        posterior = vae.encode(hr01 * 2 - 1).latent_dist
        if sample_seed is None:
            latent = posterior.mode()
        else:
            latent = posterior.sample(generator=torch.Generator().manual_seed(sample_seed))
        return ((vae.decode(latent).sample + 1) / 2).clamp(0, 1)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--vae", type=Path, default=REPO / "harness" / "assets" / "tiny" / "vae",
        help="diffusers AutoencoderKL directory (default: the shipped tiny model's VAE)",
    )  # fmt: skip
    parser.add_argument(
        "--dataset", action="append", help="dataset name (repeatable; default demo)"
    )
    parser.add_argument("--limit", type=int, default=None, help="first N images of each dataset")
    parser.add_argument("--sample", type=int, default=None, help="seed: sample instead of the mode")
    args = parser.parse_args(argv)

    import torch
    from diffusers import AutoencoderKL

    from harness.datasets import get_dataset
    from harness.evaluate import load_pair_tensors
    from harness.metrics import MetricSuite

    torch.set_num_threads(args.threads)
    machine = machine_info()
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    suite = MetricSuite(list(METRICS))
    figures: dict = {"vae": str(args.vae), "sample_seed": args.sample, "datasets": {}}
    table = []
    for name in args.dataset or ["demo"]:
        resolved = get_dataset(name).resolve()
        resolved.raise_if_problems()
        rows, start = [], time.perf_counter()
        for pair in list(resolved.pairs)[: args.limit]:
            _, hr, _ = load_pair_tensors(pair, resolved.scale)
            if hr is None:
                raise SystemExit(f"{name}: pair {pair.name} has no HR image to reconstruct")
            recon = reconstruct(vae, hr, sample_seed=args.sample)
            rows.append({"image": pair.name, **suite.score(recon, hr, image=pair.name)})
        means = {m: sum(r[m] for r in rows) / len(rows) for m in suite.per_image}
        figures["datasets"][name] = {
            "images": len(rows), "means": means, "rows": rows,
            "seconds": round(time.perf_counter() - start, 1),
        }  # fmt: skip
        table.append([name, len(rows), *(means.get(m) for m in METRICS)])
    print_table(
        ["dataset", "images", *METRICS],
        table,
        title=f"VAE reconstruction of HR ({args.vae}, "
        + ("posterior mode" if args.sample is None else f"posterior sample, seed {args.sample}")
        + ")",
    )
    write_results("vae_reconstruction", figures, machine=machine, args=args, path=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
