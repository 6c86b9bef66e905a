"""Fake-quantized attention matmuls through a diffusers attention processor.

PassionSR's ``QuantBasicTransformerBlock``/``cross_attn_forward`` (methods.md §6.1) quantizes the
operands of both attention matmuls in the UNet transformer blocks (self- and cross-attention): Q, K
and V after the projections, and the softmax output before it multiplies V, at the *activation* bits,
with per-tensor quantizers. The projections ``to_q``/``to_k``/``to_v``/``to_out.0`` are ordinary
Linear layers and are quantized as :class:`~harness.quant.layers.QuantLinear` separately. The VAE
mid-block attention matmuls are not quantized (PassionSR does not wrap ``AttnBlock``); only its
projections are.

Design: the quantizers live in an :class:`AttentionQuantizers` module attached to the diffusers
``Attention`` module as the child ``attn_quantizers`` (so they are in the state dict under
``<attention name>.attn_quantizers.*``), and :class:`QuantAttnProcessor` — a stateless processor
installed with ``attn.set_processor(...)`` — computes attention with explicit matmuls and applies them.
With quantization switched off the processor computes the same attention as diffusers'
``AttnProcessor2_0`` (up to float rounding: explicit softmax instead of fused SDPA).

Extension points (PassionSR's attention LET): :meth:`AttentionQuantizers.transform_qk` and
:meth:`AttentionQuantizers.transform_probs_v` run before the respective quantizers; both are
identities here.
"""

from __future__ import annotations

import torch
from torch import nn

from harness.quant.quantizer import FakeQuantizer, QuantSpec

ATTENTION_OPERANDS = ("q", "k", "v", "probs")


class AttentionQuantizers(nn.Module):
    """Per-tensor quantizers for Q, K, V and the softmax output of one attention module."""

    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec
        self.q = FakeQuantizer(spec)
        self.k = FakeQuantizer(spec)
        self.v = FakeQuantizer(spec)
        self.probs = FakeQuantizer(spec)
        self.quant_activations = True

    def transform_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook before quantizing Q and K (``[B, heads, N, d]``); identity."""
        return q, k

    def transform_probs_v(
        self, probs: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook before quantizing the softmax output ``[B, heads, Nq, Nk]`` and V; identity."""
        return probs, v

    def quantize(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if not self.quant_activations:
            return x
        return getattr(self, name)(x)

    def set_quant_state(self, weights: bool, activations: bool) -> None:  # noqa: ARG002
        """Attention matmuls have only activation operands; ``weights`` is ignored."""
        self.quant_activations = bool(activations)

    def quantizers(self) -> dict[str, FakeQuantizer]:
        return {name: getattr(self, name) for name in ATTENTION_OPERANDS}

    @property
    def bits(self) -> int:
        return self.spec.bits

    def extra_repr(self) -> str:
        return f"A{self.spec.bits}, quant_activations={self.quant_activations}"


class QuantAttnProcessor:
    """Attention with fake-quantized Q, K, V and softmax output (see the module docstring).

    Supports what SD-2.1/OSEDiff attention uses: self/cross attention, 3-D or 4-D (spatial) inputs,
    ``group_norm``, ``spatial_norm``, ``norm_cross``, ``norm_q``/``norm_k``, attention masks,
    ``residual_connection`` and ``rescale_output_factor``. An ``Attention`` without an
    ``attn_quantizers`` child is computed in float.
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        quantizers: AttentionQuantizers | None = getattr(attn, "attn_quantizers", None)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.reshape(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        context_len = (
            hidden_states.shape[1]
            if encoder_hidden_states is None
            else encoder_hidden_states.shape[1]
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if quantizers is not None:
            query, key = quantizers.transform_qk(query, key)
            query, key = quantizers.quantize("q", query), quantizers.quantize("k", key)
        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.float().softmax(dim=-1).to(query.dtype)
        if quantizers is not None:
            probs, value = quantizers.transform_probs_v(probs, value)
            probs, value = quantizers.quantize("probs", probs), quantizers.quantize("v", value)
        hidden_states = torch.matmul(probs, value)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if spatial:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_attention_quantizers(
    attn: nn.Module, spec: QuantSpec, quantizers: AttentionQuantizers | None = None
) -> AttentionQuantizers:
    """Attach quantizers (default: :class:`AttentionQuantizers`) and the quantized processor to a
    diffusers ``Attention`` module. Returns the attached quantizers."""
    quantizers = quantizers if quantizers is not None else AttentionQuantizers(spec)
    attn.add_module("attn_quantizers", quantizers)
    attn.set_processor(QuantAttnProcessor())
    return quantizers


def is_diffusers_attention(module: nn.Module) -> bool:
    """True for diffusers' ``Attention`` class (the one that takes attention processors)."""
    from diffusers.models.attention_processor import Attention

    return isinstance(module, Attention)
