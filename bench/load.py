"""Benchmark ``tdedup.load`` of a model family, both bundle layouts, against safetensors.

    python bench/load.py [--device cpu|cuda|auto] [--layout both|compact|serving]
                         [--repeat 5] [--delta auto|off] [--cold] [--verify default|on|off]
                         [--corpus DIR | --family DIR] [--bundle-dir DIR] [--workers N]
                         [--json PATH]

Models: minilm/{base, dup-pkg, resaved, ft-freeze, ft-full, ft-lora-merged} of the
real-checkpoint corpus (shared/corpus/build.sh; ``--corpus`` or ``TDEDUP_CORPUS``), or
every sub-folder of ``--family`` (bench/make_family.py writes one). They are packed once
per layout (default settings; ``--delta`` as pack's) into ``--bundle-dir`` (a temporary
folder by default; existing bundles there are reused).

Each measurement runs in a fresh subprocess, the sides in turn, after one warm-up run of
each (so the page cache is warm; ``--cold`` evicts the bundle and the model files from it
with ``posix_fadvise(DONTNEED)`` before every timed run instead). Sides:

- ``tdedup-compact`` / ``tdedup-serving``: ``tdedup.load(bundle, device=...)``, every
  model, of a bundle packed with that layout. On CPU, one byte of every page of every
  distinct tensor is then read (timed): raw blobs of the serving layout are tensors over
  a map of the bundle, which reads nothing until touched.
- ``st-pread`` (CPU): ``safetensors.torch.load_file(f, backend="pread")`` of every
  safetensors file of every model, which reads every byte into private memory; where this
  safetensors has no ``backend``, ``st-touch``: ``load_file`` and one byte of every page.
- ``st-cuda`` (CUDA): ``load_file(f, device="cuda")`` of every file.

Reported per side: median and min seconds, logical GB/s (tensor bytes handed out per
second: every model's tensors, shared ones counted in each model), and peak memory: on
CPU the process's max RSS minus its RSS before loading (after importing torch and
tdedup), on CUDA ``torch.cuda.max_memory_allocated``, both against the distinct tensor
bytes (median over the runs, and the worst run). Then each tdedup side's time over the reference's. Before timing, one run per
layout checks every tensor bit for bit against ``load_file`` (``--no-check`` skips it).

Targets (issue 10, CPU, same run): serving <= 0.5 x st-pread, compact <= 1.0 x;
peak RSS <= 1.1 x distinct bytes for both.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from common import add_corpus_option

FAMILY = ("base", "dup-pkg", "resaved", "ft-freeze", "ft-full", "ft-lora-merged")
LAYOUTS = ("compact", "serving")
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak_rss() -> int:
    """This process's own peak RSS: ``VmHWM`` of /proc/self/status. Not ``ru_maxrss``:
    Linux carries the parent's high-water mark across fork and exec into it, so a child
    of a runner that has grown past the child's own peak reports the runner's size (seen
    here as identical 1.33-1.58x "peaks" for every side)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def st_files(model: Path) -> list[Path]:
    return sorted(model.rglob("*.safetensors"))


def has_pread() -> bool:
    from safetensors.torch import load_file

    return "backend" in inspect.signature(load_file).parameters


def touch(tensors) -> None:
    """Read one byte of every page of every distinct tensor storage."""
    import torch

    seen = set()
    for v in tensors:
        if not v.numel():
            continue
        key = (v.data_ptr(), v.numel() * v.element_size())
        if key in seen:
            continue
        seen.add(key)
        v.reshape(-1).view(torch.uint8)[::PAGE].sum()


def child(args) -> dict:
    """One measurement, in this (fresh) process."""
    import torch
    from safetensors.torch import load_file

    import tdedup
    import tdedup.loaders.torch  # imported before the baseline is taken

    side, device = args.child, args.device
    models = json.loads(args.models)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.init()
        torch.empty(1, device=device)  # context creation is not part of a load
        torch.cuda.reset_peak_memory_stats()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    baseline = rss_now()
    kwargs = {} if args.verify == "default" else {"verify": args.verify == "on"}
    if args.workers is not None:
        kwargs["workers"] = args.workers
    t0 = time.perf_counter()
    if side.startswith("tdedup-"):
        kept = tdedup.load(args.bundle, device=device, **kwargs)
        if not cuda:
            touch(t for m in kept for t in kept[m].values())
        logical = kept.stats.logical_bytes
    else:
        kept, logical = [], 0
        for f in (Path(p) for m in models.values() for p in st_files(Path(m))):
            if side == "st-pread":
                sd = load_file(str(f), device=device, backend="pread")
            else:
                sd = load_file(str(f), device=device)
                if side == "st-touch":
                    touch(sd.values())
            logical += sum(v.numel() * v.element_size() for v in sd.values())
            kept.append(sd)
    sync()
    seconds = time.perf_counter() - t0
    out = {"side": side, "seconds": seconds, "logical_bytes": logical,
           "peak_rss": peak_rss(), "baseline_rss": baseline}
    if cuda:
        out["peak_device"] = torch.cuda.max_memory_allocated()
    return out


def check(args) -> dict:
    """Every tensor of every model as ``tdedup.load`` gives it vs ``load_file``."""
    import torch
    from safetensors.torch import load_file

    import tdedup

    models = json.loads(args.models)
    loaded = tdedup.load(args.bundle, device=args.device)
    compared = bad = 0
    problems: list[str] = []
    for name, folder in models.items():
        got = loaded[name]
        for f in st_files(Path(folder)):
            prefix = f.parent.relative_to(folder).as_posix()
            for key, ref in load_file(str(f), device=args.device).items():
                k = key if prefix == "." else f"{prefix}/{key}"
                t = got.get(k)
                ok = (t is not None and t.dtype == ref.dtype and t.shape == ref.shape
                      and torch.equal(t.reshape(-1).view(torch.uint8),
                                      ref.reshape(-1).view(torch.uint8)))
                compared += 1
                if not ok:
                    bad += 1
                    problems.append(f"{name}:{k}")
    return {"compared": compared, "mismatched": bad, "examples": problems[:5]}


def evict(paths: list[Path]) -> None:
    """Drop the clean page-cache pages of ``paths`` (no root needed)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_child(args, side: str, bundle: Path | None, models: dict, mode: str = "--child"
              ) -> dict:
    cmd = [sys.executable, __file__, mode, side, "--device", args.device,
           "--models", json.dumps(models), "--verify", args.verify]
    if bundle is not None:
        cmd += ["--bundle", str(bundle)]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    if args.cold:
        files = [p for m in models.values() for p in Path(m).rglob("*") if p.is_file()]
        evict(files + ([bundle] if bundle else []))
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"error: {side} run failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def report(results: dict[str, list[dict]], distinct: int, device: str, ref: str,
           cold: bool) -> dict:
    cuda = device.startswith("cuda")
    print(f"\n== {device} ({'cold' if cold else 'warm'} page cache) ==")
    med = {s: statistics.median(r["seconds"] for r in rs) for s, rs in results.items()}
    summary: dict = {}
    for side, rs in results.items():
        logical = rs[0]["logical_bytes"]
        if cuda:
            peaks = [r["peak_device"] for r in rs]
            what = "peak device"
        else:
            peaks = [r["peak_rss"] - r["baseline_rss"] for r in rs]
            base = statistics.median(r["baseline_rss"] for r in rs)
            what = f"peak RSS baseline {mb(base)} +"
        peak, worst = statistics.median(peaks), max(peaks)
        mem = (f"{what} {mb(peak)} ({peak / distinct:.2f} x distinct; worst "
               f"{worst / distinct:.2f} x)")
        gbs = logical / med[side] / 1e9
        print(f"{side:>15}: median {med[side] * 1e3:8.1f} ms (min "
              f"{min(r['seconds'] for r in rs) * 1e3:8.1f}), {gbs:6.2f} GB/s logical "
              f"({mb(logical)}), {mem}")
        summary[side] = {"median_s": med[side], "min_s": min(r["seconds"] for r in rs),
                         "logical_bytes": logical, "gb_per_s": gbs,
                         "peak_bytes": peak, "peak_x_distinct": peak / distinct,
                         "worst_peak_x_distinct": worst / distinct}
    for side in results:
        if side.startswith("tdedup-") and ref in med:
            ratio = med[side] / med[ref]
            summary[side]["ratio_to_ref"] = ratio
            target = {"tdedup-serving": 0.5, "tdedup-compact": 1.0}[side]
            verdict = "" if cuda else (f" (target <= {target}: "
                                       f"{'met' if ratio <= target else 'NOT met'})")
            print(f"time {side} / {ref}: {ratio:.2f}{verdict}")
    return summary


def family_models(args) -> dict[str, str]:
    if args.family is not None:
        found = {p.name: str(p) for p in sorted(args.family.iterdir())
                 if p.is_dir() and st_files(p)}
        if not found:
            raise SystemExit(f"error: {args.family}: no model folders with safetensors files")
        return found
    paths = {m: args.corpus / "minilm" / m for m in FAMILY}
    if not all(p.is_dir() for p in paths.values()):
        raise SystemExit(f"error: corpus MiniLM family not found under {args.corpus}/minilm "
                         "(run shared/corpus/build.sh, or pass --family DIR)")
    return {m: str(p) for m, p in paths.items()}


def pack_layout(models: dict[str, str], out: Path, layout: str, delta: str) -> bool:
    """Pack ``models`` into ``out`` with ``layout``; False if this tdedup has no layouts."""
    import tdedup

    if out.exists():
        return True
    kwargs = {"delta": delta}
    if "layout" in inspect.signature(tdedup.pack).parameters:
        kwargs["layout"] = layout
    elif layout != "compact":
        return False
    t0 = time.perf_counter()
    r = tdedup.pack([f"{m}={p}" for m, p in models.items()], out, **kwargs)
    print(f"packed {len(models)} models ({layout}): {mb(r.logical_bytes)} -> "
          f"{mb(r.bundle_bytes)} in {time.perf_counter() - t0:.1f} s ({r.encodings})",
          flush=True)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_corpus_option(ap)
    ap.add_argument("--family", type=Path, help="folder of model folders (make_family.py)")
    ap.add_argument("--bundle-dir", type=Path)
    ap.add_argument("--layout", default="both", choices=("both", *LAYOUTS))
    ap.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--delta", default="auto", choices=("auto", "off"))
    ap.add_argument("--verify", default="default", choices=("default", "on", "off"),
                    help="load()'s verify argument (default: load's own default)")
    ap.add_argument("--cold", action="store_true", help="evict the files before each run")
    ap.add_argument("--no-check", action="store_true", help="skip the bit-exact check")
    ap.add_argument("--workers", type=int)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--child")
    ap.add_argument("--check-child")
    ap.add_argument("--bundle")
    ap.add_argument("--models")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.check_child:
        print(json.dumps(check(args)))
        return

    import torch

    import tdedup

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    models = family_models(args)
    layouts = LAYOUTS if args.layout == "both" else (args.layout,)
    tmp = tempfile.TemporaryDirectory()
    bundle_dir = args.bundle_dir or Path(tmp.name)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    bundles: dict[str, Path] = {}
    for layout in layouts:
        path = bundle_dir / f"family-{layout}-{args.delta}.tdd"
        if pack_layout(models, path, layout, args.delta):
            bundles[layout] = path
        else:
            print(f"skipped layout {layout}: this tdedup's pack() has no layout argument")
    if not bundles:
        raise SystemExit("error: nothing to measure")
    with tdedup.open_bundle(next(iter(bundles.values()))) as b:
        summary = b.manifest.summary
    distinct, total = summary["distinct_tensor_bytes"], summary["tensor_bytes"]
    print(f"{len(models)} models: tensor bytes {mb(total)}, distinct {mb(distinct)} "
          f"(overlap {1 - distinct / total:.0%}); repeat {args.repeat}, cpus {os.cpu_count()}"
          f", device {args.device}" + (f" ({torch.cuda.get_device_name()})" if cuda else ""),
          flush=True)
    checks = {}
    if not args.no_check:
        for layout, path in bundles.items():
            checks[layout] = c = run_child(args, layout, path, models, "--check-child")
            print(f"bit-exact check ({layout}, {args.device}): {c['compared']} tensors, "
                  f"{c['mismatched']} mismatched {c['examples'] or ''}", flush=True)
    if cuda:
        ref = "st-cuda"
    else:
        ref = "st-pread" if has_pread() else "st-touch"
    sides = {f"tdedup-{lay}": path for lay, path in bundles.items()}
    sides[ref] = None
    for side, path in sides.items():  # warm-up: page cache, first-import costs
        run_child(args, side, path, models)
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for _ in range(args.repeat):
        for side, path in sides.items():
            results[side].append(run_child(args, side, path, models))
    figures = report(results, distinct, args.device, ref, args.cold)
    if args.json:
        args.json.write_text(json.dumps({
            "device": args.device, "cold": args.cold, "repeat": args.repeat,
            "distinct_bytes": distinct, "tensor_bytes": total, "checks": checks,
            "sides": figures, "runs": results}, indent=1))
    tmp.cleanup()
    if any(c["mismatched"] for c in checks.values()):
        raise SystemExit("error: tensors differ from load_file (see the check lines above)")


if __name__ == "__main__":
    main()
