"""``python -m jaxquant``: the main job (see ``jaxquant.cli``); ``--compare-dtypes`` compares data types."""

from __future__ import annotations

import json
import sys
import time


def compare_dtypes(args) -> int:
    """Quantize every SmolLM2 matrix with each data type; print stored size, bits and weight error."""
    import jax

    import jaxquant
    from jaxquant._src.study import Variant, format_rows, quantize_weights
    from jaxquant.models import smollm2

    try:
        variants = [Variant.parse(s) for s in args.compare_dtypes.split(",") if s.strip()]
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
    print(f"SmolLM2-135M-Instruct: {config.layers} layers, {params / 1e6:.1f}M params, {len(axes)} "
          f"matrices (linears along their input axis, the embedding along hidden), block {args.block_size}")
    print("Note: the GGUF stores the linears as Q4_1 and the embedding as Q8_0, so the float "
          "weights are already on a coarse grid; errors are relative to those weights.\n")
    rows = quantize_weights(weights, variants, args.block_size, axes, progress=not args.no_progress)
    print(format_rows(rows, params))
    print(f"\nbits/param counts every stored byte of the whole model (norms in bf16); "
          f"{time.perf_counter() - start:.1f} s")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(dict(model="SmolLM2-135M-Instruct", params=params, layers=config.layers,
                           block_size=args.block_size, jax=jax.__version__, results=rows), f, indent=2)
        print(f"wrote {args.report}")
    return 0


def main(argv=None) -> int:
    from jaxquant.cli import main as run
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
