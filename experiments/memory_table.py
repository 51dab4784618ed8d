"""Seed 001's "7B model" table recomputed from real Llama-2-7B shapes (jax.eval_shape, no 7B allocation).

    .venv/bin/python experiments/memory_table.py
Rows: bf16; NF4 with float32 absmax; NF4 + double quantization (jaxquant's real quantizer on
abstract arrays); and the seed's way of counting, a float32 scale AND a float32 zero point per
block of 64. Writes experiments/results/memory_table.json and memory_table.png.
"""

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import jaxquant as jq
from jaxquant._src.memory import llama2_7b_shapes

OUT = pathlib.Path(__file__).parent / "results"


def main():
    rows = jq.memory_table()  # every 2-D weight quantized (the seed's "7B x 4 bits" count)
    params = rows[0]["params"]
    blocks = sum(n for n in (s[0] * s[1] for s in llama2_7b_shapes().values() if len(s) == 2)) / 64
    codes_gb = rows[1]["weights_gb"]
    seed = dict(format="nf4 (seed: scale+zp)", weights_gb=codes_gb, constants_gb=blocks * 8 / 1e9,
                total_gb=codes_gb + blocks * 8 / 1e9, params=params)
    seed["bits_per_param"] = 8 * seed["total_gb"] * 1e9 / params
    rows.append(seed)
    print(jq._src.memory.format_memory_table(rows))
    print("\nThe seed counts a float32 scale and a float32 zero point per block of 64 (1.0 bit/param of "
          "constants); NF4 is symmetric absmax, so one float32 per block (0.5 bit/param), and double "
          "quantization brings that to 8 bits per block plus 32 bits per 256 blocks (0.127 bit/param).")
    OUT.mkdir(exist_ok=True)
    (OUT / "memory_table.json").write_text(json.dumps(rows, indent=2))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = [r["format"] for r in rows]
    ax.barh(names, [r["weights_gb"] for r in rows], label="weights / codes")
    ax.barh(names, [r["constants_gb"] for r in rows], left=[r["weights_gb"] for r in rows],
            label="block constants")
    for i, r in enumerate(rows):
        ax.text(r["total_gb"] + 0.1, i, f"{r['total_gb']:.2f} GB, {r['bits_per_param']:.3f} bits", va="center")
    ax.set_xlabel("GB (1e9 bytes), Llama-2-7B, 6.74B parameters")
    ax.set_xlim(0, max(r["total_gb"] for r in rows) * 1.45)
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(OUT / "memory_table.png", dpi=120)
    print(f"wrote {OUT / 'memory_table.json'} and memory_table.png")


if __name__ == "__main__":
    main()
