"""``python -m bench.one_step_fit``: how well a UNet learns the one-step SR map, on held-out latent pairs.

The tiny model's SR fidelity is limited by stage 3a of ``qbench train-tiny`` (docs/model.md): the UNet
at T=999 must turn z_L (the encoded bicubic upsampling) into x0 = (z_L − √(1−ᾱ)·ε)/√ᾱ ≈ z_HR, and
every error in ε is amplified 14.6×. This bench replays that objective from a finished training run's
work directory (its stage-2 ``base_model`` and its ``stage3_pairs.pt``), with a choice of what trains,
and reports the latent MSE on held-out pairs next to the identity map's (z_L itself, the latent
analogue of bicubic). A model that cannot beat the identity here cannot beat bicubic.

Variants (``--variant``):

- ``lora``: what ``train-tiny`` trains (OSEDiff's three UNet LoRA adapters at rank 32 with ``lora_B`` at
  ``TrainConfig.lora_b_lr_mult`` × the learning rate, ``conv_in`` fully);
- ``lora-bias``: ``lora`` plus every bias, every norm's affine parameters and ``conv_out`` fully (LoRA
  cannot move a bias; these would be stored as full tensors in ``osediff.pkl``);
- ``full``: every UNet parameter.

``--scratch`` starts from a randomly initialised UNet (diffusers' config, with the output GroupNorm)
instead of the diffusion-pretrained one, and ``--norm-eps`` changes the GroupNorm epsilon of that fresh
UNet (a config value of the same class). ``--no-out-norm`` removes ``conv_norm_out``/``conv_act``
(:func:`harness.tiny.arch.drop_output_norm`; the shipped tiny UNet has none). ``--loss log-mse``
trains on the mean of log(per-pair MSE) (:func:`harness.tiny.train.pair_loss`).

Besides the pooled held-out MSE, the table reports "dB vs identity": the mean over held-out pairs of
10·log10(identity MSE / model MSE), which weights every pair alike as a per-image mean PSNR does (a
smooth pair, where the identity map is nearly exact, counts as much as a textured one).

Usage::

    python -m bench.one_step_fit --work /path/to/train_run --variant full --steps 400 --lr 1e-3
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

from bench._common import base_parser, machine_info, print_table, write_results
from harness.tiny.train import SR_LOSSES

VARIANTS = ("lora", "lora-bias", "full")
COLUMNS = (
    "step",
    "seconds",
    "all",
    "all_identity",
    "bicubic",
    "bicubic_identity",
    "db_vs_identity",
)


def trainable(unet, variant: str) -> list[tuple[str, object]]:
    """Mark and return the ``(name, parameter)`` pairs that ``variant`` trains."""
    from harness.tiny.train import osediff_unet_trainable

    for p in unet.parameters():
        p.requires_grad_(False)
    for name, p in unet.named_parameters():
        if variant == "full":
            p.requires_grad_(True)
            continue
        train = osediff_unet_trainable(name)
        if variant == "lora-bias":
            train = train or name.endswith("bias") or "norm" in name or "conv_out" in name
        p.requires_grad_(train)
    return [(n, p) for n, p in unet.named_parameters() if p.requires_grad]


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="a `qbench train-tiny` OUT dir")
    parser.add_argument("--variant", choices=VARIANTS, default="lora")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--holdout", type=int, default=150, help="last N pairs are held out")
    parser.add_argument("--scratch", action="store_true", help="random UNet, no stage 2")
    parser.add_argument("--norm-eps", type=float, default=None, help="with --scratch")
    parser.add_argument("--no-out-norm", action="store_true", help="drop conv_norm_out/conv_act")
    parser.add_argument(
        "--loss", choices=SR_LOSSES, default="mse",
        help="log-mse: mean over pairs of log(per-pair MSE), the latent analogue of mean PSNR",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args(argv)

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file

    from harness.loaders import load_unet
    from harness.lora import add_osediff_adapters
    from harness.tiny import arch
    from harness.tiny.train import (
        TrainConfig,
        _cosine_lr,
        _encode_pool,
        _load_checkpoint,
        lora_param_groups,
        one_step_x0,
        pair_loss,
    )

    torch.set_num_threads(args.threads)
    machine = machine_info()
    work = args.work / "work"
    base = work / "base_model"
    pairs = _load_checkpoint(work / "stage3_pairs.pt")
    if pairs is None or not base.is_dir():
        raise SystemExit(f"{work}: needs base_model/ and stage3_pairs.pt of a train-tiny run")
    vae = AutoencoderKL.from_pretrained(base / "vae").eval()
    if args.scratch:
        config = dict(arch.UNET_CONFIG)
        if args.norm_eps is not None:
            config["norm_eps"] = args.norm_eps
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**config)
    else:
        unet = load_unet(base / "unet")
    if args.no_out_norm:
        arch.drop_output_norm(unet)
    context = load_file(str(base / "prompt_embeds.safetensors"))["prompt_embeds"]
    z_mean, z_std, z_hr = _encode_pool(vae, pairs["lr"], pairs["hr"])
    bicubic = [r["lr"] == "bicubic" for r in pairs["records"]]
    n = len(z_mean)
    train_idx = list(range(n - args.holdout))
    held = list(range(n - args.holdout, n))
    abar = arch.build_scheduler().alphas_cumprod.double()[999]
    if args.variant != "full":
        add_osediff_adapters(vae, unet, 32, 8)
    named = trainable(unet, args.variant)
    groups = [g for g in lora_param_groups([unet], TrainConfig.lora_b_lr_mult) if g["params"]]
    optimizer = torch.optim.Adam(groups, lr=args.lr)

    def x0(z_l):
        t = torch.full((len(z_l),), 999, dtype=torch.long)
        eps = unet(z_l, t, encoder_hidden_states=context.expand(len(z_l), -1, -1)).sample
        return one_step_x0(z_l, eps, abar)

    def per_pair_mse(a, b):
        return (a - b).pow(2).flatten(1).mean(1)

    # identity-map MSE of every held-out pair: fixed, so computed once
    identity_mse = per_pair_mse(z_mean[held], z_hr[held])
    bicubic_rows = [k for k, i in enumerate(held) if bicubic[i]]

    @torch.no_grad()
    def held_out() -> dict[str, float]:
        """One UNet pass per held-out pair; every pair has the same size, so a pooled MSE is the
        mean of the per-pair ones."""
        unet.eval()
        mse = torch.cat([
            per_pair_mse(x0(z_mean[held[s : s + 25]]), z_hr[held[s : s + 25]])
            for s in range(0, len(held), 25)
        ])  # fmt: skip
        unet.train()
        out = {}
        for label, rows_ in (("all", slice(None)), ("bicubic", bicubic_rows)):
            out[label] = float(mse[rows_].mean())
            out[f"{label}_identity"] = float(identity_mse[rows_].mean())
        # mean over held-out pairs of 10·log10(identity MSE / model MSE): per-pair like mean PSNR
        out["db_vs_identity"] = float((10 * torch.log10(identity_mse / mse)).mean())
        return out

    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    rows, start = [], time.perf_counter()
    unet.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(args.lr, step, args.steps) * group["lr_mult"]
        optimizer.zero_grad(set_to_none=True)
        idx = [rng.choice(train_idx) for _ in range(args.batch)]
        z_l = z_mean[idx] + z_std[idx] * torch.randn_like(z_mean[idx])
        loss = pair_loss(x0(z_l), z_hr[idx], args.loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        if (step + 1) % max(1, args.steps // 4) == 0 or step + 1 == args.steps:
            rows.append(
                {"step": step + 1, "seconds": round(time.perf_counter() - start), **held_out()}
            )
    print_table(
        ["step", "s", "held-out MSE", "identity", "bicubic-LR MSE", "identity", "dB vs identity"],
        [[r[k] for k in COLUMNS] for r in rows],
        title=f"one-step latent fit: {args.variant}{' from scratch' if args.scratch else ''}, "
        f"lr {args.lr:g}, {args.steps} steps, {len(held)} held-out pairs",
    )
    figures = {
        "work": str(args.work), "variant": args.variant, "scratch": args.scratch,
        "norm_eps": args.norm_eps, "no_out_norm": args.no_out_norm, "loss": args.loss, "lr": args.lr, "steps": args.steps, "batch": args.batch,
        "trainable_parameters": sum(p.numel() for _, p in named), "rows": rows,
    }  # fmt: skip
    write_results("one_step_fit", figures, machine=machine, args=args, path=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
