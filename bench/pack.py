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
- copy + fsync: the original files copied into a fresh folder and fsynced, ``cores``
  threads: the floor the disk sets for unpack (the same bytes written, nothing decoded).
  Every run keeps its folders until the end (~1.4 GB a run in the temporary folder):
  writing over blocks just freed is several times faster than to new ones on some disks;
- verify: ``tdedup.verify``, every blob decoded and every file's sha256 (no writes), to
  tell decoding cost from writing cost;
- zstd-3 per file: every original file compressed whole at level 3, ``cores`` threads;
- distinct + byte planes: hash every tensor, byte-plane zstd (tdedup's own codec, at
  the default level) of each distinct tensor once; tensors only, no other file.

``--cores N`` pins the process to N CPUs (the targets are for 2: pack >= 0.5 GB/s,
unpack >= 0.8 GB/s, issue 15). The family includes the three MiniLM GGUF files
(``--no-gguf``: the six safetensors models only). ``--zipnn`` adds ZipNN per tensor with
exact dedup, and each dense F32/BF16 model alone, tdedup's bundle vs ZipNN.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zstandard

import tdedup
from tdedup._fs import mapped
from tdedup.analyzers.scan import hash_models, index_models
from tdedup.format.bundle.constants import DEFAULT_LEVEL
from tdedup.format.codecs.byteplane import byteplane_compress
from tdedup.format.checkpoints.dtypes import element_width
from common import add_corpus_option

FAMILY = ("base", "dup-pkg", "resaved", "ft-freeze", "ft-full", "ft-lora-merged")
GGUFS = ("f16.gguf", "f32.gguf", "q8_0.gguf")  # minilm-gguf: the family's GGUF files
# One model at a time against ZipNN (issue 15): the corpus's dense F32 and BF16 files.
SINGLES = ("minilm/base", "minilm/bf16.safetensors")


def corpus_family(root: Path, with_gguf: bool = True) -> list[Path] | None:
    paths = [root / "minilm" / name for name in FAMILY]
    if with_gguf:
        paths += [root / "minilm-gguf" / name for name in GGUFS]
    if not (root / "MANIFEST.sha256").is_file() or not all(p.exists() for p in paths):
        return None
    return paths


def zipnn_available() -> bool:
    try:
        import zipnn  # noqa: F401  (built from its sdist; never a dependency of tdedup)
    except ImportError:
        return False
    return True


_ZIPNN_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def zipnn_dedup(paths: list[Path], threads: int) -> int:
    """ZipNN 0.5.4 per tensor with exact dedup: each distinct tensor compressed once
    (float dtypes by ZipNN's byte grouping and Huffman/zstd, others by its byte mode),
    plus every file's non-tensor bytes at zstd-3."""
    from zipnn import ZipNN

    scanned = hash_models(index_models([str(p) for p in paths]))
    zs = {dt: ZipNN(input_format="byte", bytearray_dtype=name, threads=threads)
          for dt, name in _ZIPNN_DTYPES.items()}
    plain = ZipNN(input_format="byte", bytearray_dtype="uint32", threads=threads,
                  byte_reorder=0)
    total = 0
    for h in scanned.first_occurrences().values():
        path, off, n = scanned.locate(h)
        with mapped(path) as view:
            data = bytes(view[off:off + n])
        z = zs.get(h.record.dtype)
        try:
            total += min(n, len((z or plain).compress(data)))
        except Exception:  # noqa: BLE001 (ZipNN refuses some lengths: count them raw)
            total += n
    return total + other_bytes(paths)


def other_bytes(paths: list[Path]) -> int:
    """zstd-3 of every file's non-tensor bytes (headers, tokenizers, configs)."""
    c = zstandard.ZstdCompressor(level=3)
    total = 0
    for m in index_models([str(p) for p in paths]):
        for f in m.files:
            with mapped(f.abs_path) as view:
                parts, cursor = [], 0
                for t in f.tensors:
                    parts.append(view[cursor:t.offset])
                    cursor = max(cursor, t.end)
                parts.append(view[cursor:f.size])
                total += len(c.compress(b"".join(parts)))
    return total


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
    """Seconds and result of ``fn()``, after ``os.sync()``: on ext4 an fsync waits for
    every file's dirty pages in its journal transaction, so without it unpack's fsyncs
    would also pay for writing back the bundle pack had just written."""
    os.sync()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def copy_fsync(files: list[Path], dest: Path, threads: int) -> None:
    """The original files copied into ``dest`` and fsynced, on ``threads`` threads: what
    this disk allows an unpack (same bytes written and flushed, nothing decoded)."""
    dest.mkdir()

    def one(item: tuple[int, Path]) -> None:
        i, f = item
        with open(f, "rb") as src, open(dest / str(i), "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, enumerate(files)))


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
    add_corpus_option(ap)
    ap.add_argument("--generate-mb", type=float, default=90.0,
                    help="size of each generated model when the corpus is absent")
    ap.add_argument("--no-gguf", action="store_true",
                    help="the six safetensors models only (the figures before issue 15)")
    ap.add_argument("--zipnn", action="store_true",
                    help="also compare with ZipNN (pip install zipnn; not a dependency)")
    args = ap.parse_args()

    cpus = sorted(os.sched_getaffinity(0))
    if args.cores < len(cpus):
        os.sched_setaffinity(0, cpus[:args.cores])
    cores = len(os.sched_getaffinity(0))

    with tempfile.TemporaryDirectory(prefix="tdedup-bench-pack-") as tmp:
        tmp = Path(tmp)
        family = corpus_family(args.corpus, with_gguf=not args.no_gguf)
        source = f"corpus {args.corpus}/minilm" + ("" if args.no_gguf else " + minilm-gguf")
        if family is None:
            family = generate_family(tmp / "gen", args.generate_mb)
            source = f"generated family ({args.generate_mb:.0f} MB per model; corpus absent)"
        files = files_of(family)
        logical = sum(f.stat().st_size for f in files)
        for f in files:  # warm the page cache
            with mapped(f) as view:
                view[::4096].tobytes()

        bundle = tmp / "family.tdd"
        times: dict[str, list[float]] = {k: [] for k in ("pack", "unpack", "copy", "verify",
                                                          "zstd", "planes")}
        sizes: dict[str, int] = {}
        for i in range(args.repeat + 1):  # run 0 is the warm-up
            t, r = timed(lambda: tdedup.pack([str(p) for p in family], bundle,
                                             workers=cores))
            sizes["pack"] = r.bundle_bytes
            times["pack"].append(t)
            # Every run writes a fresh folder, as a user's unpack does, and so does the
            # copy it is compared with: on this VM writing to blocks just freed is ~4x
            # faster than to new ones (bench/RESULTS.md), so deleting the last run's
            # output first would flatter both.
            t, u = timed(lambda: tdedup.unpack(bundle, tmp / f"out{i}", workers=cores))
            assert u.bytes == logical, (u.bytes, logical)
            times["unpack"].append(t)
            t, _ = timed(lambda: copy_fsync(files, tmp / f"copy{i}", cores))
            times["copy"].append(t)
            t, _ = timed(lambda: tdedup.verify(bundle))
            times["verify"].append(t)
            t, sizes["zstd"] = timed(lambda: zstd_per_file(files, cores))
            times["zstd"].append(t)
            t, sizes["planes"] = timed(lambda: distinct_byteplanes(family))
            times["planes"].append(t)
        med = {k: statistics.median(v[1:]) for k, v in times.items()}
        zipnn = args.zipnn and zipnn_available()
        if zipnn:
            t, sizes["zipnn"] = timed(lambda: zipnn_dedup(family, cores))
            med["zipnn"] = t
            singles = single_models(args.corpus, tmp, cores) if family[0].parent.name == \
                "minilm" else []

    print(f"models: {', '.join(p.name for p in family)} from {source}")
    print(f"logical bytes: {logical:,} in {len(files)} files; {cores} cores; median of "
          f"{args.repeat} after a warm-up; zstd level {DEFAULT_LEVEL} in tdedup")
    print(f"{'method':<34}{'stored bytes':>15}{'ratio':>8}{'seconds':>9}{'GB/s':>7}")
    sizes["copy"] = logical
    rows = [("tdedup pack", "pack", "pack"), ("tdedup unpack", "pack", "unpack"),
            ("copy + fsync of the files (disk)", "copy", "copy"),
            ("tdedup verify (decode, no writes)", "pack", "verify"),
            ("zstd-3 per file", "zstd", "zstd"),
            ("distinct tensors + byte-plane zstd", "planes", "planes")]
    if zipnn:
        rows.append(("ZipNN per tensor, exact dedup (1 run)", "zipnn", "zipnn"))
    for label, size_key, time_key in rows:
        s, t = sizes[size_key], med[time_key]
        print(f"{label:<34}{s:>15,}{logical / s:>8.3f}{t:>9.3f}{logical / t / 1e9:>7.2f}")
    print(f"bundle / distinct byte-plane size: {sizes['pack'] / sizes['planes']:.4f}; "
          f"targets on 2 cores (issue 15): pack >= 0.5 GB/s "
          f"({'met' if logical / med['pack'] / 1e9 >= 0.5 else 'NOT met'}), unpack >= 0.8 GB/s "
          f"({'met' if logical / med['unpack'] / 1e9 >= 0.8 else 'NOT met'}); unpack / copy "
          f"time: {med['unpack'] / med['copy']:.2f}")
    if zipnn and singles:
        print_singles(singles)
    sys.stdout.flush()


#: The level whose planes take zstd's entropy effort (``btultra2``) in the one-model table.
EFFORT_LEVEL = 19


def single_models(root: Path, tmp: Path, cores: int) -> list[tuple]:
    """Each dense model alone (nothing to deduplicate), tdedup at the default level and at
    EFFORT_LEVEL vs ZipNN: whole bundles, and tensor blobs alone against ZipNN's tensors
    (its figure has no container: names, shapes and hashes are not counted)."""
    from tdedup.format.bundle.reader import Bundle

    out = []
    for rel in SINGLES:
        path = root / rel
        if not path.exists():
            continue
        sizes = []
        for level in (DEFAULT_LEVEL, EFFORT_LEVEL):
            r = tdedup.pack([str(path)], tmp / "single.tdd", workers=cores, level=level)
            with Bundle(tmp / "single.tdd") as b:
                layouts = {f.layout for m in b.manifest.models for f in m.files}
                tensors = sum(x.stored_length for h, x in b.manifest.blobs.items()
                              if h not in layouts)
            sizes.append((r.bundle_bytes, tensors))
        dtypes = {t.dtype for m in index_models([str(path)]) for f in m.weight_files
                  for t in f.tensors}
        zipnn = zipnn_dedup([path], cores)
        out.append((rel, "/".join(sorted(dtypes & set(_ZIPNN_DTYPES))), *sizes, zipnn,
                    zipnn - other_bytes([path])))
    return out


def print_singles(singles: list[tuple]) -> None:
    print("\none model at a time (bundle: tensors + the file's other bytes + manifest):")
    print(f"{'model':<26}{'dtype':>6}{'bundle L' + str(DEFAULT_LEVEL):>13}"
          f"{'bundle L' + str(EFFORT_LEVEL):>13}{'ZipNN':>13}{'/ZipNN':>8}{'/ZipNN':>8}"
          f"{'tensors L' + str(EFFORT_LEVEL):>14}{'ZipNN':>13}{'/ZipNN':>8}")
    for name, dtype, (b1, _), (b19, t19), z, zt in singles:
        print(f"{name:<26}{dtype:>6}{b1:>13,}{b19:>13,}{z:>13,}{b1 / z:>8.4f}{b19 / z:>8.4f}"
              f"{t19:>14,}{zt:>13,}{t19 / zt:>8.4f}")


if __name__ == "__main__":
    main()
