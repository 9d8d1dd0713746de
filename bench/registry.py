"""Benchmark ``tdedup.Registry``: the cost of adding the k-th model of a family.

    python bench/registry.py [--repeat 5] [--corpus DIR] [--bundle PATH] [--device cpu]

Models: minilm/{base, dup-pkg, resaved, ft-freeze, ft-full, ft-lora-merged} of the
real-checkpoint corpus, packed once into one bundle (default settings). Each repeat starts
an empty registry and adds the models one at a time, in that order
(``reg.load(bundle, [model])``); every model is also loaded alone with
``safetensors.torch.load_file(backend="pread")`` (every byte read) in the same process.
The page cache is warm for both (one warm-up round first).

Printed per model: the bytes the registry added (its blobs not yet resident), the median
time of adding it, the median time of loading it alone with safetensors, and the ratio.
Expected: adding a model whose base is resident costs time in proportion to its unique
bytes (``dup-pkg`` and ``resaved`` add nothing and take ~no time).
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from common import add_corpus_option

FAMILY = ("base", "dup-pkg", "resaved", "ft-freeze", "ft-full", "ft-lora-merged")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_corpus_option(ap)
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file

    import tdedup

    paths = {m: args.corpus / "minilm" / m for m in FAMILY}
    if not all(p.is_dir() for p in paths.values()):
        sys.exit(f"corpus MiniLM family not found under {args.corpus}/minilm "
                 "(run shared/corpus/build.sh)")
    pread = "backend" in inspect.signature(load_file).parameters
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or Path(tmp) / "minilm.tdd"
        if not bundle.exists():
            tdedup.pack([f"{m}={p}" for m, p in paths.items()], bundle)
        added: dict[str, list[float]] = {m: [] for m in FAMILY}
        alone: dict[str, list[float]] = {m: [] for m in FAMILY}
        nbytes: dict[str, int] = {}
        for r in range(args.repeat + 1):  # round 0: warm-up
            reg = tdedup.Registry(device=args.device)
            for m in FAMILY:
                t0 = time.perf_counter()
                loaded = reg.place(bundle, [m])
                sync()
                if r:
                    added[m].append(time.perf_counter() - t0)
                nbytes[m] = loaded.stats.device_bytes
            del reg, loaded
            for m in FAMILY:
                f = str(paths[m] / "model.safetensors")
                t0 = time.perf_counter()
                sd = (load_file(f, device=args.device, backend="pread") if pread
                      else {k: v.clone() for k, v in load_file(f, device=args.device).items()})
                sync()
                if r:
                    alone[m].append(time.perf_counter() - t0)
                del sd
    ref = "load_file(pread)" if pread else "load_file+clone"
    print(f"device {args.device}, repeat {args.repeat}, cpus {os.cpu_count()}; "
          f"alone = safetensors {ref}")
    print(f"{'model':>15} {'added MB':>9} {'add ms':>8} {'alone ms':>9} {'add/alone':>9} "
          f"{'ms per added MB':>15}")
    for m in FAMILY:
        a, s = statistics.median(added[m]), statistics.median(alone[m])
        per = f"{a * 1e3 / (nbytes[m] / 1e6):.2f}" if nbytes[m] else "-"
        print(f"{m:>15} {nbytes[m] / 1e6:9.1f} {a * 1e3:8.1f} {s * 1e3:9.1f} {a / s:9.2f} "
              f"{per:>15}")


if __name__ == "__main__":
    main()
