"""Benchmark ``tdedup pack`` / ``unpack``: throughput and ratio against two baselines.

    python bench/pack.py [--repeat 3] [--cores 2] [--corpus DIR] [--generate-mb 90]

Models: the MiniLM family of the real-checkpoint corpus (minilm/base, dup-pkg, resaved,
ft-freeze, ft-full, ft-lora-merged; ``--corpus`` or ``TDEDUP_CORPUS``, default
~/.cache/tdedup-corpus); when it is not built, a generated family of the same shape (a
base, a copy, a re-save, a half-frozen and a full fine-tune) in a temporary folder.

Throughput is GB/s of *logical* bytes (the sum of the original files' sizes, 1 GB =
1e9 bytes); ratio is logical bytes / stored bytes. Measured in one run, after one
warm-up pass so every input is in the page cache, median of ``--repeat``:

- pack: ``tdedup.pack`` (the library call the CLI makes), workers = cores;
- unpack: ``tdedup.unpack`` into a fresh folder (sha256 of every file checked, fsync);
- verify: ``tdedup.verify``, every blob decoded and every file's sha256 (no writes), to
  tell decoding cost from writing cost;
- zstd-3 per file: every original file compressed whole at level 3, ``cores`` threads;
- distinct + byte planes: hash every tensor, byte-plane zstd (tdedup's own codec, at
  the default level) of each distinct tensor once; tensors only, no other file.

``--cores N`` pins the process to N CPUs (the targets are for 2: pack >= 0.4 GB/s,
unpack >= 1 GB/s).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zstandard

import tdedup
from tdedup._fs import mapped
from tdedup.analyzers.scan import hash_models, index_models
from tdedup.format.codecs import DEFAULT_LEVEL
from tdedup.format.codecs.byteplane import byteplane_compress
from tdedup.format.checkpoints.dtypes import element_width

FAMILY = ("base", "dup-pkg", "resaved", "ft-freeze", "ft-full", "ft-lora-merged")


def corpus_family(root: Path) -> list[Path] | None:
    paths = [root / "minilm" / name for name in FAMILY]
    if not (root / "MANIFEST.sha256").is_file() or not all(p.is_dir() for p in paths):
        return None
    return paths


def generate_family(root: Path, megabytes: float) -> list[Path]:
    """base, copy, resaved (other order and metadata), half-frozen and full fine-tunes."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    shape = (384, 1536)  # MiniLM-sized matrices
    n = max(2, int(megabytes * 1e6 / (shape[0] * shape[1] * 4)))
    base = {f"encoder.layer.{i}.weight": (rng.standard_normal(shape) * 0.05).astype(np.float32)
            for i in range(n)}
    config = b'{"hidden_size": 384}'

    def save(name: str, tensors: dict, metadata=None) -> Path:
        folder = root / name
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "model.safetensors"), metadata=metadata)
        (folder / "config.json").write_bytes(config)
        return folder

    def tuned(names) -> dict:
        return {k: (v + (rng.standard_normal(shape) * 1e-4).astype(np.float32)
                    if k in names else v) for k, v in base.items()}

    keys = list(base)
    return [save("base", base), save("dup-pkg", base),
            save("resaved", dict(reversed(base.items())), {"format": "pt"}),
            save("ft-freeze", tuned(keys[len(keys) // 2:])), save("ft-full", tuned(keys)),
            save("ft-lora-merged", tuned(keys[:2]))]


def files_of(paths: list[Path]) -> list[Path]:
    return [f for m in index_models([str(p) for p in paths]) for sf in m.files
            for f in [sf.abs_path]]


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def zstd_per_file(files: list[Path], threads: int) -> int:
    c = zstandard.ZstdCompressor(level=3, threads=threads if threads > 1 else 0)
    total = 0
    for f in files:
        with mapped(f) as view:
            total += len(c.compress(view))
    return total


def distinct_byteplanes(paths: list[Path]) -> int:
    scanned = hash_models(index_models([str(p) for p in paths]))
    total = 0
    for h in scanned.first_occurrences().values():
        path, off, n = scanned.locate(h)
        with mapped(path) as view:
            total += len(byteplane_compress(view[off:off + n], element_width(h.record.dtype),
                                            DEFAULT_LEVEL))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--corpus", type=Path, default=Path(
        os.environ.get("TDEDUP_CORPUS") or Path.home() / ".cache" / "tdedup-corpus"))
    ap.add_argument("--generate-mb", type=float, default=90.0,
                    help="size of each generated model when the corpus is absent")
    args = ap.parse_args()

    cpus = sorted(os.sched_getaffinity(0))
    if args.cores < len(cpus):
        os.sched_setaffinity(0, cpus[:args.cores])
    cores = len(os.sched_getaffinity(0))

    with tempfile.TemporaryDirectory(prefix="tdedup-bench-pack-") as tmp:
        tmp = Path(tmp)
        family = corpus_family(args.corpus)
        source = f"corpus {args.corpus}/minilm"
        if family is None:
            family = generate_family(tmp / "gen", args.generate_mb)
            source = f"generated family ({args.generate_mb:.0f} MB per model; corpus absent)"
        files = files_of(family)
        logical = sum(f.stat().st_size for f in files)
        for f in files:  # warm the page cache
            with mapped(f) as view:
                view[::4096].tobytes()

        bundle = tmp / "family.tdd"
        times: dict[str, list[float]] = {k: [] for k in ("pack", "unpack", "verify", "zstd",
                                                          "planes")}
        sizes: dict[str, int] = {}
        for i in range(args.repeat + 1):  # run 0 is the warm-up
            t, r = timed(lambda: tdedup.pack([str(p) for p in family], bundle,
                                             workers=cores))
            sizes["pack"] = r.bundle_bytes
            times["pack"].append(t)
            out = tmp / "out"
            shutil.rmtree(out, ignore_errors=True)
            t, u = timed(lambda: tdedup.unpack(bundle, out, workers=cores))
            assert u.bytes == logical, (u.bytes, logical)
            times["unpack"].append(t)
            shutil.rmtree(out)
            t, _ = timed(lambda: tdedup.verify(bundle))
            times["verify"].append(t)
            t, sizes["zstd"] = timed(lambda: zstd_per_file(files, cores))
            times["zstd"].append(t)
            t, sizes["planes"] = timed(lambda: distinct_byteplanes(family))
            times["planes"].append(t)
        med = {k: statistics.median(v[1:]) for k, v in times.items()}

    print(f"models: {', '.join(p.name for p in family)} from {source}")
    print(f"logical bytes: {logical:,} in {len(files)} files; {cores} cores; median of "
          f"{args.repeat} after a warm-up; zstd level {DEFAULT_LEVEL} in tdedup")
    print(f"{'method':<34}{'stored bytes':>15}{'ratio':>8}{'seconds':>9}{'GB/s':>7}")
    rows = [("tdedup pack", "pack", "pack"), ("tdedup unpack", "pack", "unpack"),
            ("tdedup verify (decode, no writes)", "pack", "verify"),
            ("zstd-3 per file", "zstd", "zstd"),
            ("distinct tensors + byte-plane zstd", "planes", "planes")]
    for label, size_key, time_key in rows:
        s, t = sizes[size_key], med[time_key]
        print(f"{label:<34}{s:>15,}{logical / s:>8.3f}{t:>9.3f}{logical / t / 1e9:>7.2f}")
    print(f"bundle / distinct byte-plane size: {sizes['pack'] / sizes['planes']:.4f}; "
          f"targets on 2 cores: pack >= 0.4 GB/s "
          f"({'met' if logical / med['pack'] / 1e9 >= 0.4 else 'NOT met'}), unpack >= 1 GB/s "
          f"({'met' if logical / med['unpack'] / 1e9 >= 1 else 'NOT met'})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
