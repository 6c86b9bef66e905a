"""QuantConv2d / QuantLinear against float modules, split inputs, hooks, and quantized attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from harness.quant.attention import AttentionQuantizers, install_attention_quantizers
from harness.quant.layers import LayerQuantSpec, QuantConv2d, QuantLinear
from harness.quant.quantizer import MinMaxObserver, QuantSpec, observed_min_max

torch.set_num_threads(1)


def _spec(w_bits=8, a_bits=8, split_at=None, split_axis="channel", bias=False):
    return LayerQuantSpec(
        weight=QuantSpec(bits=w_bits, granularity="channel"),
        activation=QuantSpec(bits=a_bits),
        bias=QuantSpec(bits=w_bits) if bias else None,
        split_at=split_at,
        split_axis=split_axis,
    )


def _calibrate(layer, x):
    layer.init_weight_ranges(lambda q, t: q.set_range(*observed_min_max(t, q.spec)))
    for q in layer.act_quantizers:
        q.observer = MinMaxObserver()
    layer(x)
    for q in layer.act_quantizers:
        q.observer = None


def _conv(seed=0, **kw):
    torch.manual_seed(seed)
    return nn.Conv2d(6, 5, 3, padding=1, **kw)


def test_quant_conv_keeps_float_params_and_is_exact_when_switched_off():
    conv = _conv()
    layer = QuantConv2d(conv, _spec())
    assert layer.weight is conv.weight and layer.bias is conv.bias
    x = torch.randn(2, 6, 9, 9)
    _calibrate(layer, x)
    layer.set_quant_state(False, False)
    assert torch.equal(layer(x), conv(x))
    reflect = _conv(padding_mode="reflect")
    rl = QuantConv2d(reflect, _spec())
    _calibrate(rl, x)
    rl.set_quant_state(False, False)
    assert torch.equal(rl(x), reflect(x))


def test_weight_only_equals_float_conv_with_dequantized_weight():
    conv = _conv()
    layer = QuantConv2d(conv, _spec(w_bits=4))
    x = torch.randn(2, 6, 9, 9)
    _calibrate(layer, x)
    layer.set_quant_state(True, False)
    w_deq = layer.quantized_weight().detach()
    assert not torch.equal(w_deq, conv.weight)
    assert torch.allclose(layer(x), F.conv2d(x, w_deq, conv.bias, padding=1), atol=1e-6)
    # per output channel at most 16 distinct values
    assert all(len(torch.unique(row)) <= 16 for row in w_deq.reshape(5, -1))


def test_activation_error_is_isolated_against_the_dequantized_float_conv():
    conv = _conv()
    layer = QuantConv2d(conv, _spec(w_bits=4, a_bits=6))
    x = torch.randn(2, 6, 9, 9)
    _calibrate(layer, x)
    w_deq = layer.quantized_weight().detach()
    reference = nn.Conv2d(6, 5, 3, padding=1)
    with torch.no_grad():
        reference.weight.copy_(w_deq)
        reference.bias.copy_(conv.bias)
    with torch.no_grad():
        y_q, y_ref = layer(x), reference(x)
    act_delta = float((layer.act_quantizers[0].x_max - layer.act_quantizers[0].x_min) / 63)
    # |conv(Q(x)) - conv(x)| <= sum |w| * delta/2 per output channel
    bound = w_deq.abs().reshape(5, -1).sum(1) * act_delta / 2
    diff = (y_q - y_ref).abs().amax(dim=(0, 2, 3))
    assert bool((diff <= bound + 1e-5).all())
    assert float(diff.max()) > 0  # the activation quantizer did something
    # the same result as the float conv applied to the fake-quantized input
    xq = layer.act_quantizers[0](x)
    assert torch.allclose(y_q, reference(xq), atol=1e-5)


def test_quant_linear_on_3d_inputs_against_float_with_dequantized_weight():
    torch.manual_seed(1)
    lin = nn.Linear(8, 3)
    layer = QuantLinear(lin, _spec(w_bits=8, a_bits=8))
    x = torch.randn(2, 5, 8)
    _calibrate(layer, x)
    w_deq = layer.quantized_weight().detach()
    xq = layer.act_quantizers[0](x)
    assert torch.allclose(layer(x), F.linear(xq, w_deq, lin.bias), atol=1e-6)
    layer.set_quant_state(False, False)
    assert torch.equal(layer(x), lin(x))


def test_split_input_quantizers_follow_each_half():
    conv = _conv()
    x = torch.randn(2, 6, 9, 9)
    x[:, :4] *= 100.0  # first half of the concat has a much wider range
    plain = QuantConv2d(conv, _spec(a_bits=4))
    split = QuantConv2d(conv, _spec(a_bits=4, split_at=4))
    _calibrate(plain, x)
    _calibrate(split, x)
    assert len(split.act_quantizers) == 2 and len(split.weight_quantizers) == 2
    assert float(split.act_quantizers[1].x_max) < 10 < float(split.act_quantizers[0].x_max)
    for layer in (plain, split):
        layer.set_quant_state(False, True)
    small_half_error = lambda layer: float((layer.quantize_input(x) - x)[:, 4:].abs().max())  # noqa: E731
    assert small_half_error(split) < small_half_error(plain) / 10
    # each weight part has its own per-output-channel range
    assert split.weight_quantizers[0].x_min.shape == (5,)
    assert torch.allclose(
        split.weight_quantizers[1].x_max, conv.weight[:, 4:].reshape(5, -1).amax(1)
    )


def test_linear_split_on_channel_axis_and_token_quirk():
    torch.manual_seed(2)
    lin = nn.Linear(8, 3)
    x = torch.randn(1, 6, 8)
    x[..., :4] *= 50.0
    by_channel = QuantLinear(lin, _spec(a_bits=4, split_at=4))
    _calibrate(by_channel, x)
    assert float(by_channel.act_quantizers[1].x_max) < 10  # last-axis halves
    by_token = QuantLinear(lin, _spec(a_bits=4, split_at=4, split_axis="token"))
    _calibrate(by_token, x)
    # PassionSR quirk Q3: dim 1 (tokens) is split, so both halves see the wide channels
    assert float(by_token.act_quantizers[1].x_max) > 10


def test_extension_hooks_let_a_subclass_transform_input_and_weight():
    class Smoothed(QuantConv2d):
        """X' = X / s, W' = W * s (exact when nothing is quantized), plus a constant extra term."""

        def __init__(self, conv, spec):
            super().__init__(conv, spec)
            self.scale = nn.Parameter(
                torch.linspace(0.5, 2.0, conv.in_channels).reshape(1, -1, 1, 1)
            )

        def transform_input(self, x):
            return x / self.scale

        def effective_weight(self):
            return self.weight * self.scale

        def extra_output(self, x):
            return torch.zeros(1, self.out_channels, 1, 1)

    conv = _conv()
    layer = Smoothed(conv, _spec(w_bits=4, a_bits=4))
    x = torch.randn(2, 6, 9, 9)
    _calibrate(layer, x)
    layer.set_quant_state(False, False)
    assert torch.allclose(layer(x), conv(x), atol=1e-5)
    layer.set_quant_state(True, True)
    loss = layer(x).pow(2).mean()
    loss.backward()
    assert layer.scale.grad is not None


def test_bias_quantizer_is_per_tensor_at_weight_bits():
    conv = _conv()
    layer = QuantConv2d(conv, _spec(w_bits=2, bias=True))
    x = torch.randn(1, 6, 5, 5)
    _calibrate(layer, x)
    assert len(torch.unique(layer.quantized_bias())) <= 4
    layer.set_quant_state(False, True)
    assert torch.equal(layer.quantized_bias(), conv.bias)


def _attention(cross_dim=None):
    torch.manual_seed(0)
    return Attention(query_dim=16, cross_attention_dim=cross_dim, heads=2, dim_head=8)


def test_quantized_attention_processor_matches_diffusers_when_off_and_quantizes_operands():
    attn = _attention(cross_dim=12)
    x, ctx = torch.randn(2, 10, 16), torch.randn(2, 7, 12)
    attn.set_processor(AttnProcessor2_0())
    reference = attn(x, encoder_hidden_states=ctx)
    quantizers = install_attention_quantizers(attn, QuantSpec(bits=4))
    assert isinstance(attn.attn_quantizers, AttentionQuantizers)
    assert "attn_quantizers.q.x_min" in attn.state_dict()
    quantizers.set_quant_state(False, False)
    assert torch.allclose(attn(x, encoder_hidden_states=ctx), reference, atol=1e-5)
    seen = {}
    for name, q in quantizers.quantizers().items():
        q.observer = MinMaxObserver()
        seen[name] = q
    quantizers.set_quant_state(False, True)
    out = attn(x, encoder_hidden_states=ctx)
    assert float(seen["probs"].x_min) >= 0 and float(seen["probs"].x_max) <= 1
    assert all(q.is_initialized for q in seen.values())
    assert not torch.allclose(out, reference, atol=1e-4)
    # 4-D (VAE-style spatial) input goes through the same path
    spatial = Attention(
        query_dim=16, heads=1, dim_head=16, norm_num_groups=4, residual_connection=True
    )
    spatial.set_processor(AttnProcessor2_0())
    img = torch.randn(1, 16, 4, 4)
    ref = spatial(img)
    q2 = install_attention_quantizers(spatial, QuantSpec(bits=8))
    q2.set_quant_state(False, False)
    assert torch.allclose(spatial(img), ref, atol=1e-5)
