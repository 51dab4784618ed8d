"""Generate golden vectors from bitsandbytes 0.50.2 (CPU) for tests/test_bnb_golden.py.

Run with a Python that has torch and bitsandbytes (they install on Python 3.11):
    python3 -m venv /tmp/bnb && /tmp/bnb/bin/pip install torch==2.13.0 bitsandbytes==0.50.2
    /tmp/bnb/bin/python scripts/make_bnb_golden.py
Writes tests/data/bnb_golden.npz: per case, the input, bitsandbytes' packed checkpoint dict
(``QuantState.as_dict(packed=True)``) and its dequantized output. The tests need no torch.
"""

import json
import pathlib

import bitsandbytes
import bitsandbytes.functional as F
import numpy as np
import torch

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "bnb_golden.npz"


def cases():
    rng = np.random.default_rng(20261123)
    for qtype in ("nf4", "fp4"):
        for bs in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            # odd length, partial last block, one all-zero full block
            x = rng.standard_normal(3 * bs + 37).astype(np.float32)
            x[bs:2 * bs] = 0
            yield f"{qtype}_b{bs}_f32_odd", x, "float32", False
        yield f"{qtype}_b64_f32_2d", rng.standard_normal((37, 129)).astype(np.float32), "float32", False
        yield f"{qtype}_b64_bf16_2d", rng.standard_normal((48, 96)).astype(np.float32), "bfloat16", False
        yield f"{qtype}_b4096_bf16_odd", rng.standard_normal(4096 + 1001).astype(np.float32), "bfloat16", False
        tail = rng.standard_normal(64 * 3 + 10).astype(np.float32)
        tail[-10:] = 0  # all-zero PARTIAL last block: bitsandbytes stores absmax 1e-38 there
        yield f"{qtype}_b64_f32_zerotail", tail, "float32", False
        tiny = (rng.standard_normal(256) * np.where(rng.random(256) < 0.5, 1e-4, 1)).astype(np.float32)
        yield f"{qtype}_b64_f32_tiny", tiny, "float32", False  # values near FP4's +-0 and midpoints
        for bs in (32, 64):
            for dtype in ("float32", "bfloat16"):
                x = rng.standard_normal(bs * 600 + 10).astype(np.float32)
                yield f"{qtype}_b{bs}_{dtype}_dq", x, dtype, True
        heavy = rng.standard_t(2, size=64 * 300).astype(np.float32)
        yield f"{qtype}_b64_f32_dq_heavy", heavy, "float32", True
    yield from partial_block_ties()


def midpoints(qtype: str) -> np.ndarray:
    """float32 midpoints of bitsandbytes' sorted 4-bit table (REFERENCE.md)."""
    levels = np.sort(F.get_4bit_type(qtype, device="cpu").float().numpy())
    return (levels[:-1] + levels[1:]) / np.float32(2)


def partial_block_ties():
    """A partial last block whose ratios to its absmax are the table's midpoints: bitsandbytes
    divides there (``x / absmax``) where whole blocks multiply by ``1 / absmax``. The absmax is
    the one of [0.5, 4] for which the two roundings put the most such values on other codes."""
    rng = np.random.default_rng(20261202)
    for qtype in ("nf4", "fp4"):
        mids = midpoints(qtype)
        below = lambda s: np.sum(np.clip(s, -1, 1)[:, None] > mids, -1)  # sorted code index
        ties = lambda a: np.concatenate([mids * a, -mids * a]).astype(np.float32)
        moved = lambda a: int((below(ties(a) / a) != below(ties(a) * (np.float32(1) / a))).sum())
        absmax = max(np.linspace(0.5, 4, 3501).astype(np.float32), key=moved)
        tail = rng.choice(ties(absmax), 3999)
        x = np.concatenate([rng.standard_normal(4096).astype(np.float32), [absmax], tail])
        print(f"{qtype}: absmax {absmax}, {moved(absmax)} of {ties(absmax).size} midpoint values move")
        yield f"{qtype}_b4096_f32_ties", x, "float32", False


def main():
    arrays = {"meta": np.frombuffer(json.dumps({"bitsandbytes": bitsandbytes.__version__,
                                                "torch": torch.__version__}).encode(), np.uint8)}
    for name, x, dtype, dq in cases():
        t = torch.from_numpy(x).to(getattr(torch, dtype))
        qtype = name.split("_")[0]
        bs = int(name.split("_")[1][1:])
        packed, state = F.quantize_4bit(t, blocksize=bs, compress_statistics=dq, quant_type=qtype)
        deq = F.dequantize_4bit(packed, state).float()
        arrays[f"{name}/input"] = t.float().numpy()
        arrays[f"{name}/input_dtype"] = np.frombuffer(dtype.encode(), np.uint8)
        arrays[f"{name}/dequantized"] = deq.numpy()
        arrays[f"{name}/weight"] = packed.numpy()
        for key, value in state.as_dict(packed=True).items():
            arrays[f"{name}/weight.{key}"] = value.numpy()
        print(name, tuple(x.shape), dtype, "dq" if dq else "", packed.shape)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print("wrote", OUT, OUT.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
