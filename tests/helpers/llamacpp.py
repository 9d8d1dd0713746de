"""llama.cpp as a test oracle: ggml's quantizers in a tiny C program, and llama-quantize.

Built by ``shared/tools/llama-cpp.sh`` (env file ``$TDEDUP_LLAMA/env``); tests using these
are marked ``llamacpp`` and skip where it is absent."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

LLAMA = Path(os.environ.get("TDEDUP_LLAMA") or Path.home() / ".cache" / "tdedup-llama")
ORACLE_C = Path(__file__).parent / "ggml_quant_oracle.c"


def llama_env() -> dict[str, str] | None:
    """LLAMA_SRC, LLAMA_CONVERT, LLAMA_QUANTIZE from the build's env file, or None."""
    env = LLAMA / "env"
    if not env.is_file():
        return None
    out = {}
    for line in env.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            k, v = line[len("export "):].split("=", 1)
            out[k] = v.strip('"')
    return out if Path(out.get("LLAMA_QUANTIZE", "")).is_file() else None


def build_oracle(dest: Path) -> Path:
    """Compile the oracle against the libggml-base.a llama-quantize links (about a second)."""
    lib = LLAMA / "build" / "ggml" / "src" / "libggml-base.a"
    cxx = shutil.which("g++") or shutil.which("c++")
    if not lib.is_file() or cxx is None:
        raise FileNotFoundError(f"{lib} or a C++ compiler is missing")
    dest.mkdir(parents=True, exist_ok=True)
    exe = dest / "ggml_quant_oracle"
    subprocess.run([cxx, "-O1", "-x", "c", str(ORACLE_C), "-x", "none",
                    f"-I{LLAMA / 'src' / 'ggml' / 'include'}", str(lib),
                    "-lpthread", "-lm", "-fopenmp", "-o", str(exe)], check=True)
    return exe


def oracle_quantize(exe: Path, etype: str, rows: np.ndarray) -> bytes:
    """ggml_quantize_chunk(etype, rows) without an importance matrix."""
    rows = np.ascontiguousarray(rows, np.float32)
    run = subprocess.run([str(exe), str(int(GGMLQuantizationType[etype])), str(rows.shape[0]),
                          str(rows.shape[1])], input=rows.tobytes(), capture_output=True,
                         check=True)
    return run.stdout
