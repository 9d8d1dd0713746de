"""Benchmark derived tensors: precision ladders stored at the cost of one model.

    python bench/ladder.py [--corpus DIR] [--work DIR] [--level 1]

Families (real files only):

- **MiniLM ladder**: the corpus's all-MiniLM-L6-v2 F32 safetensors and its F16/BF16 casts,
  llama.cpp's ``convert_hf_to_gguf.py`` F32/F16/BF16 conversions of it, and
  ``llama-quantize`` Q8_0, Q6_K, Q5_1, Q4_0 and Q4_K_M of the F32 GGUF. llama.cpp comes from
  ``shared/tools/llama-cpp.sh`` (``$TDEDUP_LLAMA``); the converted files are cached in
  ``--work`` (default ~/.cache/tdedup-ladder).
- **SmolLM2**: the corpus's Q4_1 as shipped and its Q8_0 and F16 requantizations.

Ratio = tensor bytes of the family / stored bytes. Anchors, measured in the same run:

- exact dedup: tensor bytes / distinct tensor bytes (content hashes);
- byte-grouped zstd: tdedup's byte-plane zstd of each distinct tensor once;
- XOR vs first: every tensor XORed with the first model's tensor of the same name and byte
  length (GGUF and safetensors names matched through gguf-py's TensorNameMap) when there is
  one, byte-plane zstd of that (or of the tensor), distinct contents once.

And tdedup: ``tdedup.pack`` with ``derive="off"`` and with the default (derived on), the
bundle's full size (layouts, non-tensor files and manifest included) as stored bytes.
Per transform: how many tensors reproduce exactly and the residual bytes of those that don't.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

import tdedup
from tdedup.analyzers.derivation import canonical_names
from tdedup.analyzers.scan import hash_models, index_models
from tdedup.format.bundle.constants import BlobEncoding
from tdedup.format.checkpoints.dtypes import element_width
from tdedup.format.codecs.byteplane import byteplane_compress, byteplane_decompress
from tdedup.format.codecs.derived import parse_derived

from common import add_corpus_option

LLAMA = Path(os.environ.get("TDEDUP_LLAMA") or Path.home() / ".cache" / "tdedup-llama")
QUANTS = ("Q8_0", "Q6_K", "Q5_1", "Q4_0", "Q4_K_M")


def llama_env() -> dict[str, str]:
    env = {}
    for line in (LLAMA / "env").read_text().splitlines():
        if line.startswith("export "):
            k, v = line[7:].split("=", 1)
            env[k] = v.strip('"')
    return env


def build_minilm_ladder(corpus: Path, work: Path) -> list[str]:
    """NAME=PATH arguments of the ladder, converting what is not cached yet."""
    env = llama_env()
    work.mkdir(parents=True, exist_ok=True)
    base = corpus / "minilm" / "base"
    for t in ("f32", "f16", "bf16"):
        out = work / f"minilm-{t}.gguf"
        if not out.is_file():
            subprocess.run([sys.executable, env["LLAMA_CONVERT"], str(base), "--outtype", t,
                            "--outfile", str(out)], cwd=env["LLAMA_SRC"], check=True,
                           capture_output=True)
    for q in QUANTS:
        out = work / f"minilm-{q.lower()}.gguf"
        if not out.is_file():
            subprocess.run([env["LLAMA_QUANTIZE"], str(work / "minilm-f32.gguf"), str(out), q,
                            "2"], check=True, capture_output=True)
    args = [f"st-f32={base / 'model.safetensors'}", f"st-f16={corpus / 'minilm/f16.safetensors'}",
            f"st-bf16={corpus / 'minilm/bf16.safetensors'}"]
    args += [f"gguf-{t}={work / f'minilm-{t}.gguf'}" for t in ("f32", "f16", "bf16")]
    args += [f"{q.lower()}={work / f'minilm-{q.lower()}.gguf'}" for q in QUANTS]
    return args


def smollm_family(corpus: Path) -> list[str]:
    return [f"{n}={corpus / 'smollm' / f'{n}.gguf'}" for n in ("q4_1", "q8_0", "f16")]


def anchors(args: list[str], level: int) -> dict[str, float]:
    scanned = hash_models(index_models(args))
    total = scanned.tensor_bytes
    firsts = scanned.first_occurrences()
    distinct = sum(k[1] for k in firsts)
    canon = canonical_names(scanned)
    maps: dict[Path, np.memmap] = {}

    def read(h):
        path, off, n = scanned.locate(h)
        if path not in maps:
            maps[path] = np.memmap(path, np.uint8, "r")
        return maps[path][off:off + n]

    t0 = time.perf_counter()
    planes = sum(len(byteplane_compress(read(h), element_width(h.record.dtype), level))
                 for h in firsts.values())
    t_planes = time.perf_counter() - t0
    first = scanned.models[0].name
    first_by = {}
    for h in scanned.hashed[first]:
        r = h.record
        first_by[(canon.get((r.model, r.file, r.name), r.name), r.length)] = h
    xor, seen = 0, set()
    for m in scanned.models:
        for h in scanned.hashed[m.name]:
            if h.key in seen:
                continue
            seen.add(h.key)
            r = h.record
            data, w = read(h), element_width(r.dtype)
            ref = first_by.get((canon.get((r.model, r.file, r.name), r.name), r.length))
            if m.name != first and ref is not None:
                data = np.bitwise_xor(data, read(ref))
            xor += len(byteplane_compress(data, w, level))
    return {"tensor_bytes": total, "exact": total / distinct, "planes": total / planes,
            "planes_bytes": planes, "xor": total / xor, "xor_bytes": xor,
            "planes_seconds": t_planes}


def per_transform(bundle_path: Path) -> dict[str, list[int]]:
    """chain description -> [tensors, exact, residual bytes of the inexact ones]."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    with tdedup.open_bundle(bundle_path) as b:
        for rec in b.manifest.blobs.values():
            if rec.encoding != BlobEncoding.DERIVED_XOR_BYTEPLANE_ZSTD:
                continue
            stored = b.stored_bytes(rec)
            chain, _, _, end = parse_derived(stored)
            residual = np.frombuffer(byteplane_decompress(stored[end:], rec.decoded_length),
                                     np.uint8)
            row = out[" then ".join(t.describe() for t in chain)]
            row[0] += 1
            if residual.any():
                row[2] += len(stored)
            else:
                row[1] += 1
    return out


def layout_bytes(bundle_path: Path) -> tuple[int, int, int]:
    """(layout blobs' decoded bytes, their stored bytes, how many are stored against another)."""
    with tdedup.open_bundle(bundle_path) as b:
        digests = {f.layout for m in b.manifest.models for f in m.files}
        recs = [b.manifest.blobs[d] for d in digests]
    return (sum(r.decoded_length for r in recs), sum(r.stored_length for r in recs),
            sum(r.encoding is BlobEncoding.ZSTD_REF for r in recs))


def measure(label: str, args: list[str], level: int, tmp: Path) -> None:
    a = anchors(args, level)
    print(f"\n### {label}: {len(args)} models, {a['tensor_bytes']:,} tensor bytes")
    print("| method | stored bytes | ratio (tensor bytes / stored) | seconds |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| exact dedup (distinct tensors, raw) | {a['tensor_bytes'] / a['exact']:,.0f} "
          f"| {a['exact']:.3f} | |")
    print(f"| byte-grouped zstd of distinct tensors | {a['planes_bytes']:,} | {a['planes']:.3f} "
          f"| {a['planes_seconds']:.2f} |")
    print(f"| XOR vs first model + byte-grouped zstd | {a['xor_bytes']:,} | {a['xor']:.3f} | |")
    for derive in ("off", "auto"):
        out = tmp / f"{label}-{derive}.tdd"
        t0 = time.perf_counter()
        res = tdedup.pack(args, out, level=level, derive=derive)
        dt = time.perf_counter() - t0
        print(f"| tdedup pack --derive {derive} (whole bundle) | {res.bundle_bytes:,} | "
              f"{a['tensor_bytes'] / res.bundle_bytes:.3f} | {dt:.2f} |")
    for derive in ("off", "auto"):
        dec, stored, refs = layout_bytes(tmp / f"{label}-{derive}.tdd")
        print(f"\nlayouts (--derive {derive}): {dec:,} bytes of file headers/metadata stored "
              f"in {stored:,} ({refs} against another file's layout)")
    rows = per_transform(tmp / f"{label}-auto.tdd")
    print("\n| transform (chain) | derived tensors | reproduced exactly | stored bytes of the others |")
    print("| --- | ---: | ---: | ---: |")
    for name, (n, exact, resid) in sorted(rows.items()):
        print(f"| {name} | {n} | {exact} | {resid:,} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_corpus_option(p)
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "tdedup-ladder")
    p.add_argument("--level", type=int, default=1)
    ns = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        measure("MiniLM ladder", build_minilm_ladder(ns.corpus, ns.work), ns.level, Path(tmp))
        measure("SmolLM2 family", smollm_family(ns.corpus), ns.level, Path(tmp))


if __name__ == "__main__":
    main()
