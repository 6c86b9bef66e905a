"""``python -m bench.quant_sensitivity QUANTIZED_DIR``: which block's quantization breaks the output.

Loads a model saved by ``qbench quantize`` and measures PSNR-FP (Y-PSNR of its output against the
full-precision base model's output) on the first ``--limit`` images of ``--dataset`` with the
quantizers switched on in turn:

- everything (the saved model as evaluated), weights only, activations only;
- one unit of the model's ordered modules at a time (``OneStepSR.ordered_modules``: the VAE encoder,
  UNet and VAE decoder blocks RPQ walks), all other layers in full precision, with ``--mode``
  choosing weights+activations (``both``), ``weights`` or ``activations``;
- with ``--unit NAME``, additionally one layer (conv/linear, or an attention's matmul quantizers) of
  that unit at a time.

Everything else stays as calibrated (ranges, learned parameters): only the fake-quantization switches
(:func:`harness.quant.state.set_quant_state` per layer) change. This is how docs/quantization.md §11
located the tiny model's fragile layer.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench._common import base_parser, machine_info, print_table, write_results


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("quantized", type=Path, help="a directory written by `qbench quantize`")
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("--limit", type=int, default=2, help="first N images (default 2)")
    parser.add_argument("--mode", choices=("both", "weights", "activations"), default="both")
    parser.add_argument(
        "--unit", default=None, help="also switch the layers of this unit one by one"
    )
    args = parser.parse_args(argv)

    import torch

    from harness.datasets import get_dataset
    from harness.evaluate import load_pair_tensors
    from harness.loaders import load_model
    from harness.metrics import MetricSuite
    from harness.quant.io import load_quantized
    from harness.quant.state import iter_attention_quantizers, iter_quant_layers

    torch.set_num_threads(args.threads)
    machine = machine_info()
    qmodel = load_quantized(args.quantized)
    fp_model = load_model(qmodel.base_model)
    resolved = get_dataset(args.dataset).resolve()
    resolved.raise_if_problems()
    inputs = {
        pair.name: load_pair_tensors(pair, resolved.scale)[0]
        for pair in list(resolved.pairs)[: args.limit]
    }
    with torch.no_grad():
        fp_out = {name: fp_model.super_resolve(lr) for name, lr in inputs.items()}
    suite = MetricSuite(["psnr_fp"])
    # (label, module name, switchable quantizers): conv/linear layers, then attention matmuls
    switches = [(n, n, layer) for n, layer in iter_quant_layers(qmodel.model)]
    switches += [(f"{n} (attention)", n, q) for n, q in iter_attention_quantizers(qmodel.model)]

    def psnr_fp(enabled) -> float:
        """Mean PSNR-FP with ``enabled(label) -> (weights, activations)`` per switch."""
        for label, _, layer in switches:
            layer.set_quant_state(*enabled(label))
        scores = []
        with torch.no_grad():
            for image, lr in inputs.items():
                out = qmodel.super_resolve(lr)
                if not torch.isfinite(out).all():
                    return float("nan")
                scores.append(suite.score(out, fp=fp_out[image], image=image)["psnr_fp"])
        return sum(scores) / len(scores)

    on = {"both": (True, True), "weights": (True, False), "activations": (False, True)}[args.mode]
    rows = [
        ["everything", "W+A", len(switches), psnr_fp(lambda n: (True, True))],
        ["everything", "W", len(switches), psnr_fp(lambda n: (True, False))],
        ["everything", "A", len(switches), psnr_fp(lambda n: (False, True))],
    ]
    mode_label = {"both": "W+A", "weights": "W", "activations": "A"}[args.mode]
    units = qmodel.ordered_modules(qmodel.config.scope)
    for unit in units:
        inside = [label for label, module, _ in switches if unit.contains(module)]
        if inside:
            value = psnr_fp(lambda n, s=set(inside): on if n in s else (False, False))
            rows.append([unit.name, mode_label, len(inside), value])
    if args.unit:
        chosen = [u for u in units if u.name == args.unit]
        if not chosen:
            raise SystemExit(f"no unit {args.unit!r}; units: {', '.join(u.name for u in units)}")
        for label, module, _ in switches:
            if chosen[0].contains(module):
                rows.append([label, mode_label, 1, psnr_fp(lambda n, k=label: on if n == k else (False, False))])  # fmt: skip
    print_table(
        ["quantized", "what", "layers", "psnr_fp"],
        rows,
        title=f"{args.quantized}: PSNR-FP on the first {len(inputs)} {args.dataset} image(s) "
        "with only the named part fake-quantized",
    )
    figures = {
        "quantized": str(args.quantized),
        "method": qmodel.config.method,
        "bits": qmodel.config.bits,
        "dataset": args.dataset,
        "images": list(inputs),
        "rows": [
            dict(zip(("quantized", "what", "layers", "psnr_fp"), r, strict=True)) for r in rows
        ],
    }
    write_results("quant_sensitivity", figures, machine=machine, args=args, path=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
