"""OSEDiff's LoRA layout: which modules get adapters, the ``osediff.pkl`` format, merging.

Reference: OSEDiff ``osediff.py`` (``initialize_vae``, ``initialize_unet``, ``save_model``,
``load_ckpt``), methods.md §2.1. Target modules are collected from parameter names exactly by the
rule OSEDiff uses (our own code): UNet weights (not biases, not norms) whose name contains one of
:data:`UNET_LORA_PATTERNS` go to adapter ``default_encoder`` if the name contains ``down_blocks`` or
``conv_in``, to ``default_decoder`` if it contains ``up_blocks`` or ``conv_out``, else to
``default_others``; VAE encoder weights matching :data:`VAE_LORA_PATTERNS` (plus ``quant_conv``) go to
the VAE adapter ``default_encoder``. ``peft.LoraConfig`` is created with OSEDiff's arguments
(``r``, ``init_lora_weights="gaussian"``, ``target_modules``; peft's default ``lora_alpha``=8).
"""

from __future__ import annotations

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn

UNET_LORA_PATTERNS = (
    "to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut",
    "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj",
)  # fmt: skip
VAE_LORA_PATTERNS = (
    "conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0",
)  # fmt: skip

OSEDIFF_PKL_KEYS = (
    "vae_lora_encoder_modules",
    "unet_lora_encoder_modules",
    "unet_lora_decoder_modules",
    "unet_lora_others_modules",
    "rank_unet",
    "rank_vae",
    "state_dict_unet",
    "state_dict_vae",
)


def _weight_module_names(model: nn.Module) -> list[str]:
    names = []
    for name, _ in model.named_parameters():
        if "bias" in name or "norm" in name or not name.endswith(".weight"):
            continue
        names.append(name[: -len(".weight")])
    return names


def unet_lora_targets(unet: nn.Module) -> tuple[list[str], list[str], list[str]]:
    """(encoder, decoder, others) UNet module names, by OSEDiff's rule."""
    encoder, decoder, others = [], [], []
    for name in _weight_module_names(unet):
        if not any(p in name for p in UNET_LORA_PATTERNS):
            continue
        if "down_blocks" in name or "conv_in" in name:
            encoder.append(name)
        elif "up_blocks" in name or "conv_out" in name:
            decoder.append(name)
        else:
            others.append(name)
    return encoder, decoder, others


def vae_lora_targets(vae: nn.Module) -> list[str]:
    """VAE encoder module names (plus ``quant_conv``) by OSEDiff's rule; the decoder stays frozen."""
    targets = []
    for name in _weight_module_names(vae):
        if name == "quant_conv" or (
            "encoder" in name and any(p in name for p in VAE_LORA_PATTERNS)
        ):
            targets.append(name)
    return targets


def add_osediff_adapters(
    vae: nn.Module,
    unet: nn.Module,
    rank_unet: int,
    rank_vae: int,
    targets: dict[str, list[str]] | None = None,
) -> dict[str, list[str]]:
    """Attach OSEDiff's adapters (VAE ``default_encoder``; UNet ``default_encoder``/``_decoder``/``_others``).

    ``targets`` (from an ``osediff.pkl``) overrides the collected module lists. Returns the lists used.
    """
    if targets is None:
        enc, dec, oth = unet_lora_targets(unet)
        targets = {
            "vae_lora_encoder_modules": vae_lora_targets(vae),
            "unet_lora_encoder_modules": enc,
            "unet_lora_decoder_modules": dec,
            "unet_lora_others_modules": oth,
        }
    vae.add_adapter(
        LoraConfig(
            r=rank_vae,
            init_lora_weights="gaussian",
            target_modules=targets["vae_lora_encoder_modules"],
        ),
        adapter_name="default_encoder",
    )
    for key, adapter in (
        ("unet_lora_encoder_modules", "default_encoder"),
        ("unet_lora_decoder_modules", "default_decoder"),
        ("unet_lora_others_modules", "default_others"),
    ):
        if targets[key]:
            unet.add_adapter(
                LoraConfig(r=rank_unet, init_lora_weights="gaussian", target_modules=targets[key]),
                adapter_name=adapter,
            )
    active = [a for k, a in (("unet_lora_encoder_modules", "default_encoder"),
                             ("unet_lora_decoder_modules", "default_decoder"),
                             ("unet_lora_others_modules", "default_others")) if targets[k]]  # fmt: skip
    unet.set_adapters(active)
    return targets


def osediff_state(
    vae: nn.Module,
    unet: nn.Module,
    targets: dict,
    rank_unet: int,
    rank_vae: int,
    full_unet: bool = False,
) -> dict:
    """The ``osediff.pkl`` dict: LoRA weights and the full UNet ``conv_in``, as OSEDiff's ``save_model``.

    ``full_unet`` stores every UNet parameter (the adapters' base layers included) instead: the tiny
    model's stage 3a trains them all (``harness.tiny.train``), and :func:`load_osediff_state` copies
    whatever UNet keys the file holds, so the same loader reproduces it.
    """
    state_unet = {
        n: p.detach().cpu().clone()
        for n, p in unet.named_parameters()
        if full_unet or "lora" in n or "conv_in" in n
    }
    state_vae = {n: p.detach().cpu().clone() for n, p in vae.named_parameters() if "lora" in n}
    return {**targets, "rank_unet": rank_unet, "rank_vae": rank_vae,
            "state_dict_unet": state_unet, "state_dict_vae": state_vae}  # fmt: skip


def load_osediff_state(vae: nn.Module, unet: nn.Module, state: dict) -> None:
    """Copy an ``osediff.pkl`` dict's tensors into freshly attached adapters (OSEDiff's ``load_ckpt``)."""
    unet_params = dict(unet.named_parameters())
    vae_params = dict(vae.named_parameters())
    for table, params, label in ((state["state_dict_unet"], unet_params, "UNet"),
                                 (state["state_dict_vae"], vae_params, "VAE")):  # fmt: skip
        for name, tensor in table.items():
            if name not in params:
                raise KeyError(
                    f"{label} parameter {name!r} from the checkpoint does not exist in the model"
                )
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"{label} parameter {name!r}: checkpoint shape {tuple(tensor.shape)} "
                    f"!= model shape {tuple(params[name].shape)}"
                )
            with torch.no_grad():
                params[name].copy_(tensor)


def merge_lora_inplace(model: nn.Module) -> int:
    """Merge every active LoRA adapter into its base layer and put the plain base layer back.

    Returns the number of merged layers. Afterwards the model holds no peft modules (what OSEDiff's
    ``--merge_and_unload_lora`` and PassionSR's ``merge_lora: True`` do before quantization).
    """
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(adapter_names=list(module.lora_A.keys()))
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
            merged += 1
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(model, attr):
            if attr == "_hf_peft_config_loaded":
                setattr(model, attr, False)
            else:
                delattr(model, attr)
    return merged
