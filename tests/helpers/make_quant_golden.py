"""Regenerate tests/data/ggml_quant_golden.npz with llama.cpp's own quantizers.

The golden file lets CI check the K-quant ports bit for bit without llama.cpp. Run after
``bash shared/tools/llama-cpp.sh``, from tests/:  python -m helpers.make_quant_golden
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from helpers.llamacpp import build_oracle, oracle_quantize

TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def golden_input() -> np.ndarray:
    """Eight 256-blocks: normal, tiny, huge, subnormal, constant, zero, sparse, mixed."""
    rng = np.random.default_rng(12)
    parts = [rng.standard_normal(256), rng.standard_normal(256) * 1e-6,
             rng.standard_normal(256) * 1e30, rng.standard_normal(256) * 1e-41,
             np.full(256, -0.75), np.zeros(256),
             np.where(rng.random(256) < 0.9, 0.0, rng.standard_normal(256)),
             np.concatenate([np.full(64, 3.0), rng.standard_normal(192) * 0.01])]
    return np.concatenate(parts).astype(np.float32)


def main() -> None:
    exe = build_oracle(Path("/tmp/tdedup-ggml-oracle"))
    x = golden_input()
    out = {"input": x}
    for name in TYPES:
        out[name] = np.frombuffer(oracle_quantize(exe, name, x.reshape(8, 256)), np.uint8)
    path = Path(__file__).parent.parent / "data" / "ggml_quant_golden.npz"
    np.savez_compressed(path, **out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
