"""Benchmark ``tdedup.load`` of the corpus MiniLM family against safetensors.

    python bench/load.py [--repeat 7] [--delta auto|off] [--corpus DIR] [--bundle PATH]
                         [--workers N]

Models: minilm/{base, dup-pkg, resaved, ft-freeze, ft-full, ft-lora-merged} of the
real-checkpoint corpus (shared/corpus/build.sh; ``--corpus`` or ``TDEDUP_CORPUS``). They
are packed once (default settings; ``--delta`` as pack's) into ``--bundle`` (a temporary
file by default).

Each measurement runs in a fresh subprocess, the two sides alternately, after one warm-up
run of each (so both read from the page cache), and reports:

- ``seconds``: the load alone (imports, and packing, excluded);
- ``peak_rss``: the process's max RSS; ``baseline_rss``: its RSS after importing torch
  and tdedup, before loading.

Sides (CPU):

- ``tdedup``: ``tdedup.load(bundle, device="cpu")``, every model;
- ``st-clone``: ``safetensors.torch.load_file`` of each original model, then ``clone()``
  of every tensor. safetensors only maps the file, so without the clone nothing would
  be read; with it, each model ends in private memory, as tdedup's decoded tensors do.
  This is the reference of the time target;
- ``st-touch``: ``load_file``, then one byte of every page read (tensors stay views of
  the file map: the cheapest way to read every byte, no copy at all).

Targets: time(tdedup) <= 0.6 x time(st-clone), and peak RSS <= 1.1 x distinct tensor bytes
+ baseline. With a GPU, the CUDA figures (``tdedup`` with device="cuda" vs ``load_file``
with device="cuda") are printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAMILY = ("base", "dup-pkg", "resaved", "ft-freeze", "ft-full", "ft-lora-merged")


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(side: str, device: str, bundle: str, corpus: str, workers: int | None) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    import tdedup
    import tdedup.loaders.torch  # noqa: F401  (imported before the baseline is taken)
    from safetensors.torch import load_file

    baseline = rss_now()
    files = [Path(corpus) / "minilm" / m / "model.safetensors" for m in FAMILY]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    if side == "tdedup":
        kept = tdedup.load(bundle, device=device, workers=workers)
        extra = {"device_bytes": kept.stats.device_bytes,
                 "logical_bytes": kept.stats.logical_bytes}
    else:
        kept, extra = [], {}
        for f in files:
            sd = load_file(str(f), device=device)
            if side == "st-clone" and device == "cpu":
                sd = {k: v.clone() for k, v in sd.items()}
            elif side == "st-touch":
                for v in sd.values():
                    if v.numel():
                        v.reshape(-1).view(torch.uint8)[::4096].sum()
            kept.append(sd)
    sync()
    seconds = time.perf_counter() - t0
    return {"side": side, "seconds": seconds, "peak_rss": peak_rss(),
            "baseline_rss": baseline, **extra}


def run_child(args, side: str, device: str) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--device", device,
           "--bundle", str(args.bundle), "--corpus", str(args.corpus)]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def measure(args, device: str, sides: list[str]) -> dict[str, list[dict]]:
    for side in sides:  # warm-up: page cache, first-import costs
        run_child(args, side, device)
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for _ in range(args.repeat):
        for side in sides:
            results[side].append(run_child(args, side, device))
    return results


def report(results: dict[str, list[dict]], distinct: int, device: str, ref: str) -> None:
    print(f"\n== {device} ==")
    med = {s: statistics.median(r["seconds"] for r in rs) for s, rs in results.items()}
    for side, rs in results.items():
        peak = statistics.median(r["peak_rss"] for r in rs)
        base = statistics.median(r["baseline_rss"] for r in rs)
        print(f"{side:>9}: median {med[side] * 1e3:7.1f} ms (min "
              f"{min(r['seconds'] for r in rs) * 1e3:.1f}), peak RSS {mb(peak)} = baseline "
              f"{mb(base)} + {mb(peak - base)} ({(peak - base) / distinct:.2f} x distinct)")
    for side in results:
        if side != "tdedup":
            print(f"time tdedup / {side}: {med['tdedup'] / med[side]:.2f}")
    t = results["tdedup"]
    if device == "cpu":
        worst = max((r["peak_rss"] - r["baseline_rss"]) / distinct for r in t)
        print(f"target: time <= 0.60 x {ref}: {med['tdedup'] / med[ref]:.2f}; "
              f"peak RSS - baseline <= 1.10 x distinct: worst {worst:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=Path(
        os.environ.get("TDEDUP_CORPUS") or Path.home() / ".cache" / "tdedup-corpus"))
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--delta", default="auto", choices=("auto", "off"))
    ap.add_argument("--workers", type=int)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.device, str(args.bundle), str(args.corpus),
                               args.workers)))
        return

    import tdedup

    paths = [args.corpus / "minilm" / m for m in FAMILY]
    if not all(p.is_dir() for p in paths):
        sys.exit(f"corpus MiniLM family not found under {args.corpus}/minilm "
                 "(run shared/corpus/build.sh)")
    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle is None:
            args.bundle = Path(tmp) / "minilm.tdd"
        if not args.bundle.exists():
            r = tdedup.pack([f"{m}={p}" for m, p in zip(FAMILY, paths)], args.bundle,
                            delta=args.delta)
            print(f"packed {len(FAMILY)} models: {mb(r.logical_bytes)} -> "
                  f"{mb(r.bundle_bytes)} ({r.encodings})")
        with tdedup.open_bundle(args.bundle) as b:
            summary = b.manifest.summary
        distinct, total = summary["distinct_tensor_bytes"], summary["tensor_bytes"]
        print(f"tensor bytes {mb(total)}, distinct {mb(distinct)} "
              f"(overlap {1 - distinct / total:.0%}); repeat {args.repeat}, "
              f"cpus {os.cpu_count()}")
        cpu = measure(args, "cpu", ["tdedup", "st-clone", "st-touch"])
        report(cpu, distinct, "cpu", "st-clone")
        import torch

        if torch.cuda.is_available():
            report(measure(args, "cuda", ["tdedup", "st-cuda"]), distinct, "cuda",
                   "st-cuda")


if __name__ == "__main__":
    main()
