"""``qbench train-tiny``: train the embedded tiny OSEDiff-like model, on this machine, from scratch.

Three stages, each seeded and checkpointed (an interrupted run resumes from the last checkpoint):

1. **VAE** (``AutoencoderKL``, f=2, 12 latent channels: :mod:`harness.tiny.arch`): L1 reconstruction + a small KL term on random HR crops. The
   latent scaling factor is then set to 1/std of the posterior samples (SD's 0.18215 plays this role).
2. **UNet diffusion pretraining**: a real ε-prediction DDPM over all 1000 timesteps of SD-2.1's
   scaled-linear schedule on HR latents with the constant context, so the timestep embedding carries
   meaning (QArtSR's TRQ runs the UNet at other timesteps).
3. **One-step SR fine-tuning** (OSEDiff): peft LoRA on the UNet (three adapters) and on the VAE
   encoder, UNet ``conv_in`` fully trained, decoder frozen; LR→bicubic×4→encoder→UNet at T=999→x0→
   decoder. Two phases: 3a fits the one-step map in latent space on pre-encoded pairs (every UNet
   parameter, a deviation; see :func:`_train_one_step_latent` for why), 3b trains the whole
   pipeline (OSEDiff's trainable set). LR is bicubic ÷4 (PIL) for a fraction of the crops and the ``realesrgan-train``
   degradation for the rest. Loss: image + latent error toward the encoded HR, each as the mean over
   the batch's pairs of log(per-pair MSE) (:func:`pair_loss`, a deviation). Deviation from
   OSEDiff: no LPIPS/VSD terms (their weights cannot be had here) — the tiny model targets fidelity.
   The LoRA is saved in OSEDiff's ``osediff.pkl`` format and the merged model is shipped.

Training images: :mod:`harness.tiny.photos` (never ``../shared/data``, never the demo photos).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from harness.model import InferenceSettings
from harness.tiny import arch, photos

PREPARED_LONG_SIDE = 1280


SR_LOSSES = ("mse", "log-mse")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    # stage 1: VAE
    vae_steps: int = 2800
    vae_batch: int = 8
    vae_crop: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # stage 2: UNet diffusion pretraining
    unet_steps: int = 1500
    unet_batch: int = 16
    unet_crop: int = 64
    unet_lr: float = 4e-4
    # stage 3a: one-step SR, latent loss only on pre-encoded pairs (cheap: no VAE in the loop)
    sr_latent_steps: int = 4000
    sr_latent_batch: int = 8
    sr_latent_lr: float = 1e-3
    # What stage 3a trains: "all" UNet parameters (deviation from OSEDiff, see
    # :func:`_train_one_step_latent`) or "lora" (OSEDiff's LoRA adapters and ``conv_in``).
    sr_latent_params: str = "all"
    # stage 3b: one-step SR through the whole pipeline (image + latent loss, VAE-encoder LoRA too)
    sr_steps: int = 600
    sr_batch: int = 4
    sr_crop: int = 96
    sr_lr: float = 1e-4
    lora_rank_unet: int = 32
    lora_rank_vae: int = 8
    # Learning-rate multiplier of every LoRA ``lora_B`` (stage 3). Under Adam, multiplying B's
    # learning rate by m (B starts at 0) is the same training as multiplying peft's ``lora_alpha`` by m.
    # OSEDiff trains rank 4 with peft's default alpha 8, a LoRA scale alpha/r = 2; at rank 32 the
    # default alpha gives 0.25, so 8 restores OSEDiff's effective scale while the ``osediff.pkl``
    # keeps the default alpha its loader assumes. Measured here (300 steps of stage 3a, w48 UNet, a
    # throwaway script): held-out latent MSE 0.18 with 8 and 0.50 with 1. (Its "full fine-tuning: 0.08"
    # was not reproduced by bench.one_step_fit: 0.22 after 400 steps; docs/model.md.)
    lora_b_lr_mult: float = 8.0
    sr_latent_weight: float = 1.0
    # Stage-3 loss over a batch: "mse" (the batch's mean squared error) or "log-mse" (the mean over
    # pairs of log(per-pair MSE), the training analogue of the per-image mean PSNR the tables report;
    # see :func:`pair_loss`).
    sr_loss: str = "log-mse"
    degraded_fraction: float = 0.3
    sr_pool: int = 1200
    # data: each photo is resized so its long side is uniform in this range before cropping
    long_side_min: int = 400
    long_side_max: int = 1280
    checkpoint_every: int = 250
    require_debian_photos: bool = True

    def __post_init__(self) -> None:
        # checked here, not when stage 3 starts an hour into a run
        if self.sr_latent_params not in ("all", "lora"):
            raise ValueError(
                f"sr_latent_params must be 'all' or 'lora', got {self.sr_latent_params!r}"
            )
        if self.sr_loss not in SR_LOSSES:
            raise ValueError(f"sr_loss must be one of {SR_LOSSES}, got {self.sr_loss!r}")

    @classmethod
    def quick(cls) -> TrainConfig:
        """A few steps of each stage on small crops: exercises the whole path in tests."""
        return cls(vae_steps=3, vae_batch=2, vae_crop=32, unet_steps=3, unet_batch=2, unet_crop=32,
                   sr_latent_steps=3, sr_latent_batch=2,
                   sr_steps=3, sr_batch=1, sr_crop=96, sr_pool=6, checkpoint_every=2,
                   require_debian_photos=False, lora_rank_unet=2, lora_rank_vae=2)  # fmt: skip


# ----------------------------------------------------------------------------- data
class PhotoPool:
    """Training photos in memory (long side ≤ 1280) and a seeded random-crop sampler."""

    def __init__(self, require_debian: bool):
        self.sources = photos.training_sources(require_debian=require_debian)
        if not self.sources:
            raise FileNotFoundError("no training photos are available")
        self.images: list[Image.Image] = []
        for source in self.sources:
            image = source.load()
            scale = PREPARED_LONG_SIDE / max(image.size)
            if scale < 1:
                size = (round(image.width * scale), round(image.height * scale))
                image = image.resize(size, Image.BICUBIC, reducing_gap=None)
            self.images.append(image)

    def manifest(self) -> list[dict]:
        return [dataclasses.asdict(s) for s in self.sources]

    def crop(self, rng: random.Random, size: int, cfg: TrainConfig) -> np.ndarray:
        """A random ``size``×``size`` HR crop (float32 HWC in [0, 1]) at a random scale, random flip."""
        image = self.images[rng.randrange(len(self.images))]
        long_side = rng.uniform(cfg.long_side_min, cfg.long_side_max)
        scale = min(1.0, long_side / max(image.size))
        # region in the prepared image that maps to a size×size crop at this scale
        region = min(round(size / scale), image.width, image.height)
        x0 = rng.randrange(image.width - region + 1)
        y0 = rng.randrange(image.height - region + 1)
        crop = image.crop((x0, y0, x0 + region, y0 + region))
        if region != size:
            crop = crop.resize((size, size), Image.BICUBIC, reducing_gap=None)
        array = np.asarray(crop, dtype=np.float32) / 255.0
        if rng.random() < 0.5:
            array = array[:, ::-1]
        if rng.random() < 0.5:
            array = array[::-1]
        return np.ascontiguousarray(array)


def bicubic_down(hr: np.ndarray, scale: int = 4) -> np.ndarray:
    """HR float [0,1] → LR uint8 by PIL bicubic ÷scale (antialiased, like MATLAB's imresize)."""
    image = Image.fromarray((hr * 255.0 + 0.5).astype(np.uint8))
    return np.asarray(image.resize((image.width // scale, image.height // scale), Image.BICUBIC))


def to_batch(arrays: list[np.ndarray]) -> torch.Tensor:
    """List of HWC [0,1] arrays → N×3×H×W in [-1, 1]."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() * 2 - 1


# ---------------------------------------------------------------------- checkpoints
def _save_checkpoint(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def _load_checkpoint(path: Path) -> dict | None:
    if not path.exists():
        return None
    # weights_only: a checkpoint planted in the output directory must not run code on resume; the
    # payload is tensors, state dicts, ints, strings and random.getstate() tuples.
    return torch.load(path, map_location="cpu", weights_only=True)


class Logger:
    def __init__(self, path: Path, echo: Callable[[str], None] | None):
        self.path, self.echo = path, echo

    def __call__(self, record: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.echo:
            items = " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
            )
            self.echo(items)


def _cosine_lr(base: float, step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _run_stage(
    name, model_params, steps, lr, ckpt_path, state_modules, step_fn, cfg, log, rng_seed
):
    """Generic resumable loop: ``step_fn(rng) -> dict(loss=...)`` with Adam and a cosine LR.

    ``model_params`` is a list of parameters, or of ``{"params": [...], "lr_mult": m}`` groups whose
    learning rate is ``m`` times the stage's.
    """
    if model_params and isinstance(model_params[0], dict):
        groups = [{"params": g["params"], "lr_mult": g.get("lr_mult", 1.0)} for g in model_params]
    else:
        groups = [{"params": list(model_params), "lr_mult": 1.0}]
    model_params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.Adam(groups, lr=lr)
    rng = random.Random(rng_seed)
    torch.manual_seed(rng_seed)
    start = 0
    ckpt = _load_checkpoint(ckpt_path)
    if ckpt is not None:
        for key, module in state_modules.items():
            module.load_state_dict(ckpt["modules"][key])
        optimizer.load_state_dict(ckpt["optimizer"])
        rng.setstate(ckpt["rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        start = ckpt["step"]
        log({"stage": name, "event": "resumed", "step": start})
    t0 = time.time()
    for step in range(start, steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(lr, step, steps) * group["lr_mult"]
        optimizer.zero_grad(set_to_none=True)
        metrics = step_fn(rng)
        metrics["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model_params, 1.0)
        optimizer.step()
        done = step + 1
        if done % 50 == 0 or done == steps:
            log({"stage": name, "step": done, "of": steps, "loss": float(metrics["loss"].detach()),
                 **{k: float(v.detach()) for k, v in metrics.items() if k != "loss"},
                 "lr": _cosine_lr(lr, step, steps), "sec": round(time.time() - t0, 1)})  # fmt: skip
        if done % cfg.checkpoint_every == 0 or done == steps:
            _save_checkpoint(ckpt_path, {
                "modules": {k: m.state_dict() for k, m in state_modules.items()},
                "optimizer": optimizer.state_dict(), "rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(), "step": done})  # fmt: skip


# --------------------------------------------------------------------------- stages
def train_vae(vae, pool, cfg, work, log):
    vae.train()

    def step(rng):
        x = to_batch([pool.crop(rng, cfg.vae_crop, cfg) for _ in range(cfg.vae_batch)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        l1 = (recon - x).abs().mean()
        kl = posterior.kl().mean() / (x.shape[-1] * x.shape[-2])
        with torch.no_grad():
            psnr = 10 * torch.log10(4.0 / F.mse_loss(recon.clamp(-1, 1), x))
        return {"loss": l1 + cfg.vae_kl_weight * kl, "l1": l1, "psnr": psnr}

    _run_stage("vae", list(vae.parameters()), cfg.vae_steps, cfg.vae_lr, work / "stage1_vae.pt",
               {"vae": vae}, step, cfg, log, cfg.seed + 1)  # fmt: skip
    vae.eval()


@torch.no_grad()
def latent_scale(vae, pool, cfg) -> float:
    rng = random.Random(cfg.seed + 99)
    x = to_batch([pool.crop(rng, cfg.vae_crop, cfg) for _ in range(32)])
    z = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(0))
    return float(1.0 / z.std())


def train_unet_diffusion(unet, vae, context, scheduler, pool, cfg, work, log):
    unet.train()
    abar = scheduler.alphas_cumprod.float()
    sf = vae.config.scaling_factor

    def step(rng):
        with torch.no_grad():
            x = to_batch([pool.crop(rng, cfg.unet_crop, cfg) for _ in range(cfg.unet_batch)])
            z0 = vae.encode(x).latent_dist.sample() * sf
        t = torch.randint(0, 1000, (z0.shape[0],))
        noise = torch.randn_like(z0)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        eps = unet(zt, t, encoder_hidden_states=context.expand(z0.shape[0], -1, -1)).sample
        return {"loss": F.mse_loss(eps, noise)}

    _run_stage("unet-diffusion", list(unet.parameters()), cfg.unet_steps, cfg.unet_lr,
               work / "stage2_unet.pt", {"unet": unet}, step, cfg, log, cfg.seed + 2)  # fmt: skip
    unet.eval()


def build_sr_pool(pool, cfg, work, log) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Fixed pool of (LR, HR) training pairs: bicubic for most, realesrgan-train for a fraction."""
    path = work / "stage3_pairs.pt"
    cached = _load_checkpoint(path)
    if cached is not None:
        return cached["lr"], cached["hr"], cached["records"]
    from harness.degradation import degrade

    rng = random.Random(cfg.seed + 3)
    lrs, hrs, records = [], [], []
    margin = (
        16  # degraded crops are made 32 px larger (the degradation needs >= 128 px) then cropped
    )
    for i in range(cfg.sr_pool):
        if rng.random() < cfg.degraded_fraction:
            big = pool.crop(rng, cfg.sr_crop + 2 * margin, cfg)
            seed = cfg.seed * 100003 + i
            lr_big, _ = degrade(big, "realesrgan-train", seed=seed)
            hr = big[margin : margin + cfg.sr_crop, margin : margin + cfg.sr_crop]
            m = margin // 4
            lr = lr_big[m : m + cfg.sr_crop // 4, m : m + cfg.sr_crop // 4]
            records.append({"index": i, "lr": "realesrgan-train", "seed": seed})
        else:
            hr = pool.crop(rng, cfg.sr_crop, cfg)
            lr = bicubic_down(hr)
            records.append({"index": i, "lr": "bicubic"})
        lrs.append(torch.from_numpy(np.ascontiguousarray(lr)))
        hrs.append(torch.from_numpy((hr * 255.0 + 0.5).astype(np.uint8)))
    lr_t, hr_t = torch.stack(lrs), torch.stack(hrs)
    _save_checkpoint(path, {"lr": lr_t, "hr": hr_t, "records": records})
    log({"stage": "sr-pairs", "pairs": len(records),
         "degraded": sum(r["lr"] != "bicubic" for r in records)})  # fmt: skip
    return lr_t, hr_t, records


def _bicubic_up_batch(lr_uint8: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """N×h×w×3 uint8 → N×3×H×W in [-1, 1] via PIL bicubic (as OSEDiff's inference)."""
    ups = []
    for array in lr_uint8.numpy():
        image = Image.fromarray(array)
        ups.append(
            np.asarray(image.resize((image.width * scale, image.height * scale), Image.BICUBIC))
        )
    return torch.from_numpy(np.stack(ups)).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def _encode_pool(vae, lr_pool, hr_pool, batch: int = 32):
    """Posterior mean/std of the bicubic-upsampled LR and the posterior mean of the HR, scaled."""
    sf = vae.config.scaling_factor
    means, stds, targets = [], [], []
    for start in range(0, len(lr_pool), batch):
        x = _bicubic_up_batch(lr_pool[start : start + batch])
        hr = hr_pool[start : start + batch].permute(0, 3, 1, 2).float() / 127.5 - 1
        posterior = vae.encode(x).latent_dist
        means.append(posterior.mean * sf)
        stds.append(posterior.std * sf)
        targets.append(vae.encode(hr).latent_dist.mean * sf)
    return torch.cat(means), torch.cat(stds), torch.cat(targets)


def one_step_x0(z_l: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """OSEDiff's x0 = (z − √(1−ᾱ)·ε)/√ᾱ in float64 (ᾱ of the one-step timestep), returned as float32."""
    return ((z_l.double() - (1 - abar).sqrt() * eps.double()) / abar.sqrt()).float()


def pair_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Stage-3 loss: ``mse`` over the batch, or ``log-mse``, the mean of log(per-pair MSE).

    Why ``log-mse``: the tables average PSNR per image, i.e. −10·log10(MSE) per image, while a batch
    MSE is dominated by textured crops and leaves the smooth ones (where bicubic is near-perfect and
    any drift of the one-step map costs many dB) almost unweighted. Measured with
    ``python -m bench.one_step_fit --variant full --steps 1600 --lr 1e-3 --no-out-norm``: the same
    held-out MSE (0.094 vs 0.093) but a per-pair mean of −3.7 dB against the identity map instead of
    −4.6 dB.
    """
    per_pair = (pred - target).pow(2).flatten(1).mean(1)
    if kind == "mse":
        return per_pair.mean()
    if kind == "log-mse":
        return per_pair.clamp_min(1e-12).log().mean()
    raise ValueError(f"sr_loss must be one of {SR_LOSSES}, got {kind!r}")


def osediff_unet_trainable(name: str) -> bool:
    """OSEDiff's stage-3 UNet parameters: the LoRA adapters and the fully trained ``conv_in``."""
    return "lora" in name or "conv_in" in name


def lora_param_groups(models, lora_b_lr_mult: float) -> list[dict]:
    """The trainable parameters of ``models`` as ``_run_stage`` groups: ``lora_B`` at ``lora_b_lr_mult``
    times the stage's learning rate (:attr:`TrainConfig.lora_b_lr_mult`), everything else at 1×."""
    named = [(n, p) for m in models for n, p in m.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if "lora_B" not in n], "lr_mult": 1.0},
        {"params": [p for n, p in named if "lora_B" in n], "lr_mult": lora_b_lr_mult},
    ]


def _train_one_step_latent(unet, vae, context, lr_pool, hr_pool, abar, timestep, params, cfg, work,
                           log):  # fmt: skip
    """Stage 3a: the one-step map at T in latent space only, z_L → x0(UNet(z_L, T)) ≈ z_HR.

    The first shipped tiny model trained stage 3 through the VAE from the start and never came close
    to its own VAE's quality (train PSNR 13-16 dB): at T=999, x0 = (z − √(1−ᾱ)ε)/√ᾱ amplifies every
    error in ε by 1/√ᾱ ≈ 14.6, and the diffusion-pretrained UNet starts far from the near-identity
    map SR needs (latent MSE ≈ 80 at step 0 in a trial here). Fitting that map on pre-encoded latents
    costs a UNet pass per sample instead of a VAE encode + UNet + VAE decode, so many more steps fit
    in the budget; stage 3b then fine-tunes the whole pipeline on images. The VAE-encoder LoRA is
    still zero here, so the encoder is the base encoder.

    Deviation from OSEDiff (``TrainConfig.sr_latent_params = "all"``): every UNet parameter trains in
    this phase, not only the LoRA adapters and ``conv_in``. Held-out latent MSE after 400 steps of
    this objective (``bench.one_step_fit``, docs/model.md): LoRA + ``conv_in`` 0.50, every parameter
    0.22 — a tiny UNet pretrained for minutes is much further from the one-step map than SD-2.1 is,
    and rank-32 adapters cannot close that distance in the budget. ``osediff.pkl`` then stores the
    full UNet tensors (:func:`harness.lora.osediff_state` with ``full_unet``); stage 3b trains
    OSEDiff's set (LoRA, ``conv_in``, VAE-encoder LoRA) again.
    ``lat_identity`` in the log is the MSE of the identity map z_L → z_HR: the latent-space analogue
    of bicubic, which the model must beat.
    """
    z_mean, z_std, z_hr = _encode_pool(vae, lr_pool, hr_pool)
    identity = F.mse_loss(z_mean, z_hr)
    log({"stage": "sr-latent-pool", "pairs": len(z_mean), "lat_identity": float(identity)})
    unet.train()

    def step(rng):
        idx = [rng.randrange(len(z_mean)) for _ in range(cfg.sr_latent_batch)]
        z_l = z_mean[idx] + z_std[idx] * torch.randn_like(z_mean[idx])
        t = torch.full((len(idx),), timestep, dtype=torch.long)
        eps = unet(z_l, t, encoder_hidden_states=context.expand(len(idx), -1, -1)).sample
        z_h = one_step_x0(z_l, eps, abar)
        loss = pair_loss(z_h, z_hr[idx], cfg.sr_loss)
        return {"loss": loss, "lat": F.mse_loss(z_h, z_hr[idx]),
                "lat_identity": F.mse_loss(z_mean[idx], z_hr[idx])}  # fmt: skip

    _run_stage("one-step-sr-latent", params, cfg.sr_latent_steps, cfg.sr_latent_lr,
               work / "stage3a_latent.pt", {"unet": unet}, step, cfg, log, cfg.seed + 5)  # fmt: skip


def train_one_step(vae, unet, context, scheduler, pool, cfg, work, log, timestep=999):
    from harness.lora import add_osediff_adapters

    lr_pool, hr_pool, _ = build_sr_pool(pool, cfg, work, log)
    targets = add_osediff_adapters(vae, unet, cfg.lora_rank_unet, cfg.lora_rank_vae)
    for n, p in vae.named_parameters():
        p.requires_grad_("lora" in n)

    abar = scheduler.alphas_cumprod.double()[timestep]
    sf = vae.config.scaling_factor
    # stage 3a: every UNet parameter, or OSEDiff's set (TrainConfig.sr_latent_params)
    for n, p in unet.named_parameters():
        p.requires_grad_(cfg.sr_latent_params == "all" or osediff_unet_trainable(n))
    unet_params = lora_param_groups([unet], cfg.lora_b_lr_mult)
    _train_one_step_latent(unet, vae, context, lr_pool, hr_pool, abar, timestep, unet_params, cfg,
                           work, log)  # fmt: skip
    # stage 3b: OSEDiff's trainable set (UNet LoRA + conv_in, VAE-encoder LoRA)
    for n, p in unet.named_parameters():
        p.requires_grad_(osediff_unet_trainable(n))
    params = lora_param_groups([unet, vae], cfg.lora_b_lr_mult)
    unet.train()
    vae.train()

    def step(rng):
        idx = [rng.randrange(len(lr_pool)) for _ in range(cfg.sr_batch)]
        x = _bicubic_up_batch(lr_pool[idx])
        hr = hr_pool[idx].permute(0, 3, 1, 2).float() / 127.5 - 1
        z_l = vae.encode(x).latent_dist.sample() * sf
        t = torch.full((x.shape[0],), timestep, dtype=torch.long)
        eps = unet(z_l, t, encoder_hidden_states=context.expand(x.shape[0], -1, -1)).sample
        z_h = one_step_x0(z_l, eps, abar)
        image = vae.decode(z_h / sf).sample
        with torch.no_grad():
            z_hr = vae.encode(hr).latent_dist.mean * sf
        loss = pair_loss(image, hr, cfg.sr_loss) + cfg.sr_latent_weight * pair_loss(
            z_h, z_hr, cfg.sr_loss
        )
        with torch.no_grad():
            psnr = 10 * torch.log10(4.0 / F.mse_loss(image.clamp(-1, 1), hr))
        return {"loss": loss, "img": F.mse_loss(image, hr), "lat": F.mse_loss(z_h, z_hr),
                "psnr": psnr}  # fmt: skip

    modules = {"unet": unet, "vae": vae}
    _run_stage("one-step-sr", params, cfg.sr_steps, cfg.sr_lr, work / "stage3_sr.pt", modules, step,
               cfg, log, cfg.seed + 4)  # fmt: skip
    unet.eval()
    vae.eval()
    return targets


# ------------------------------------------------------------------------------ main
def _save_diffusers_dir(directory: Path, vae, unet, scheduler, context) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    arch.save_unet(unet, directory / "unet")
    vae.save_pretrained(directory / "vae", safe_serialization=True)
    scheduler.save_pretrained(directory / "scheduler")
    save_file({"prompt_embeds": context.contiguous()}, str(directory / "prompt_embeds.safetensors"))


@torch.no_grad()
def _check_osediff_loader(base_dir: Path, model_dir: Path) -> dict:
    """Loader 2 on real trained weights: base model + osediff.pkl must reproduce the merged model."""
    from harness.loaders import load_diffusers_dir, load_osediff

    merged = load_diffusers_dir(model_dir)
    via_pkl = load_osediff(base_dir, model_dir / "osediff.pkl")
    lr = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a, b = merged.super_resolve(lr), via_pkl.super_resolve(lr)
    return {
        "max_abs_diff": float((a - b).abs().max()),
        "images_equal_within_1e-4": bool((a - b).abs().max() < 1e-4),
    }


def train_tiny(
    out_dir: str | Path,
    cfg: TrainConfig | None = None,
    echo=print,
    allow_config_change: bool = False,
) -> Path:
    """Run (or resume) all three stages; write the merged model as a diffusers directory in ``out_dir``.

    ``out_dir/work/`` keeps checkpoints and the training log; ``out_dir/model/`` the shipped model
    (``vae/``, ``unet/``, ``scheduler/``, ``prompt_embeds.safetensors``, ``osediff.pkl``,
    ``training.json``).
    """
    from harness.lora import merge_lora_inplace, osediff_state

    cfg = cfg or TrainConfig()
    out_dir = Path(out_dir)
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / "train_config.json"
    config_json = json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)
    log = Logger(work / "train_log.jsonl", echo)
    if config_path.exists() and config_path.read_text() != config_json:
        if not allow_config_change:
            raise ValueError(
                f"{config_path} holds a different training config; use a new output directory, or "
                "pass allow_config_change (recorded in the log: the result is then no longer the "
                "output of one fixed config)"
            )
        old = json.loads(config_path.read_text())
        changed = {
            k: [old.get(k), v] for k, v in dataclasses.asdict(cfg).items() if old.get(k) != v
        }
        log({"stage": "config", "event": "changed-on-resume", "changes": changed})
        history_path = work / "train_config_history.jsonl"
        with history_path.open("a") as fh:
            fh.write(json.dumps({"previous": old, "changes": changed}) + "\n")
    config_path.write_text(config_json)
    torch.manual_seed(cfg.seed)
    t_start = time.time()
    pool = PhotoPool(cfg.require_debian_photos)
    log({"stage": "data", "photos": len(pool.sources)})

    vae = arch.build_vae(cfg.seed)
    unet = arch.build_unet(cfg.seed)
    scheduler = arch.build_scheduler()
    context = arch.build_context()

    train_vae(vae, pool, cfg, work, log)
    for p in vae.parameters():
        p.requires_grad_(False)
    scale = latent_scale(vae, pool, cfg)
    vae.register_to_config(scaling_factor=scale)
    log({"stage": "vae", "event": "scaling_factor", "value": scale})

    train_unet_diffusion(unet, vae, context, scheduler, pool, cfg, work, log)
    for p in unet.parameters():
        p.requires_grad_(False)
    # The pre-LoRA model plays the role of SD-2.1-base: OSEDiff's osediff.pkl applies to it.
    base_dir = work / "base_model"
    _save_diffusers_dir(base_dir, vae, unet, scheduler, context)
    targets = train_one_step(vae, unet, context, scheduler, pool, cfg, work, log)

    model_dir = out_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    pkl_state = osediff_state(vae, unet, targets, cfg.lora_rank_unet, cfg.lora_rank_vae,
                              full_unet=cfg.sr_latent_params == "all")  # fmt: skip
    torch.save(pkl_state, model_dir / "osediff.pkl")
    merged = merge_lora_inplace(unet) + merge_lora_inplace(vae)
    _save_diffusers_dir(model_dir, vae, unet, scheduler, context)
    # UNet tiles of 384 image pixels (192 latent pixels at f=2, overlap 96) and decoder tiles of 640
    # (320/96). Smaller tiles cost fidelity on this model: the decoder's GroupNorm statistics are per
    # tile (docs/model.md), and on a 512×768 Urban100 crop decoder tiles of 256/64 lost 0.44 dB and
    # UNet tiles of 128/64 0.25 dB against untiled inference; these tiles lose 0.37 dB together.
    inference = InferenceSettings(latent_tile=192, latent_overlap=96, vae_encoder_tile=1024,
                                  vae_encoder_overlap=64, vae_decoder_tile=320, vae_decoder_overlap=96)  # fmt: skip
    (model_dir / "inference.json").write_text(json.dumps(inference.to_dict(), indent=2))
    loader_check = _check_osediff_loader(base_dir, model_dir)
    log({"stage": "check", "event": "osediff.pkl loader vs merged model", **loader_check})
    digest = hashlib.sha256()
    for path in sorted(model_dir.rglob("*.safetensors")):
        digest.update(path.read_bytes())
    record = {
        "command": "qbench train-tiny",
        "config": dataclasses.asdict(cfg),
        "photos": pool.manifest(),
        "merged_lora_layers": merged,
        "osediff_pkl_loader_check": loader_check,
        "scaling_factor": scale,
        "weights_sha256": digest.hexdigest(),
        "torch": torch.__version__,
        "wall_seconds_this_invocation": round(time.time() - t_start, 1),
        "config_changes_on_resume": [
            json.loads(line)["changes"]
            for line in (work / "train_config_history.jsonl").read_text().splitlines()
        ]
        if (work / "train_config_history.jsonl").exists()
        else [],
    }
    (model_dir / "training.json").write_text(json.dumps(record, indent=2))
    log({"stage": "done", "model": str(model_dir)})
    return model_dir
