"""Benchmark ``tdedup add`` against packing everything again.

    python bench/add_vs_pack.py [--repeat 3] [--corpus DIR]

A family grows by one model, added to a bundle of

- "pair": the MiniLM base alone, plus the fine-tune ``minilm/ft-full``;
- "family": base, dup-pkg, resaved, ft-freeze and ft-lora-merged, plus ``ft-full``;
- "ladder": base, its F16 cast and its F32 GGUF conversion, plus the Q8_0 GGUF
  (``minilm-gguf/q8_0.gguf``): stored derived from the bundle's tensors.

Compared, in one process, after one warm-up pass so every input is in the page cache,
median of ``--repeat``:

- add: ``tdedup.add(bundle, [new])`` (the bundle's blobs kernel-copied, its tensors
  decoded once as delta and derivation candidates, the new model hashed, planned and
  encoded);
- fresh pack: ``tdedup.pack`` of every model again from the original files;
- unpack + pack: what one did before ``add`` without the original files at hand
  (``tdedup.unpack`` of the bundle, then ``tdedup.pack`` of its models and the new one).

Prints seconds, the time ratio, and the two bundles' sizes (add must be within 2%).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import tdedup
from common import add_corpus_option


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    add_corpus_option(ap)
    a = ap.parse_args()
    base = a.corpus / "minilm" / "base"
    if not (base.is_dir() and (a.corpus / "minilm-gguf" / "q8_0.gguf").is_file()):
        print(f"corpus not built at {a.corpus}", file=sys.stderr)
        return 2
    family = {n: a.corpus / "minilm" / n for n in
              ("base", "dup-pkg", "resaved", "ft-freeze", "ft-lora-merged")}
    ladder = {"base": base, "f16": a.corpus / "minilm" / "f16.safetensors",
              "f32-gguf": a.corpus / "minilm-gguf" / "f32.gguf"}
    q8 = a.corpus / "minilm-gguf" / "q8_0.gguf"
    for case, old, ft in (("pair", {"base": base}, base.parent / "ft-full"),
                          ("family", family, base.parent / "ft-full"),
                          ("ladder", ladder, q8)):
        with tempfile.TemporaryDirectory() as tmp:
            tmpd = Path(tmp)
            bundle = tmpd / "old.tdd"
            old_args = [f"{n}={p}" for n, p in old.items()]
            tdedup.pack(old_args, bundle)
            tdedup.pack([*old_args, f"ft={ft}"], tmpd / "warm.tdd")  # warm-up
            adds, packs, repacks = [], [], []
            for i in range(a.repeat):
                t0 = time.perf_counter()
                fresh = tdedup.pack([*old_args, f"ft={ft}"], tmpd / f"fresh{i}.tdd")
                packs.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                added = tdedup.add(bundle, [f"ft={ft}"], output=tmpd / f"added{i}.tdd")
                adds.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                tdedup.unpack(bundle, tmpd / f"un{i}")
                tdedup.pack([*(f"{n}={tmpd / f'un{i}' / n}" for n in old), f"ft={ft}"],
                            tmpd / f"repack{i}.tdd")
                repacks.append(time.perf_counter() - t0)
                shutil.rmtree(tmpd / f"un{i}")
            ta, tp, tr = (statistics.median(x) for x in (adds, packs, repacks))
            print(f"{case}: add {ta:.3f} s; fresh pack of all {len(old) + 1} {tp:.3f} s "
                  f"(add {ta / tp:.2f}x); unpack + pack {tr:.3f} s (add {ta / tr:.2f}x); "
                  f"sizes: added {added.bundle_bytes:,} B, fresh {fresh.bundle_bytes:,} B "
                  f"({added.bundle_bytes / fresh.bundle_bytes - 1:+.2%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
