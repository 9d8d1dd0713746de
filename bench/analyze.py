"""Benchmark ``tdedup analyze`` against a bare blake3 pass over the same tensor bytes.

    python bench/analyze.py [--repeat 7] [--profile] [--corpus DIR] [--generate-gb 1.2]

Models: every entry of the real-checkpoint corpus (shared/corpus/build.sh; ``--corpus``
or ``TDEDUP_CORPUS``, default ~/.cache/tdedup-corpus); when it is not built, a generated
family of at least ``--generate-gb`` GB (a base, a half-changed fine-tune, a sharded
re-save and an F32 GGUF with a 50k-token vocabulary) in a temporary folder.

Both passes run in this process, alternately, after one warm-up pass, so both read from
the page cache:

- analyze: what ``tdedup analyze --json`` runs, ``analyze_paths`` (read every header,
  screen every tensor, hash in full the ones the screen leaves undecided, compare),
  ``derivation_report`` (sampled) and ``render_json``. The screen (analyzers/screen.py)
  sets a tensor apart without reading it in full when no other tensor shares its length
  and three sampled places, so analyze reads fewer bytes than the bare pass: the bytes
  it hashed are printed;
- bare: for each weight file, mmap it and blake3 (all cores) each tensor's byte range,
  the ranges listed beforehand; nothing else.

The figure is median(analyze) / median(bare); the target is <= 1.1. ``--profile`` also
times hashing variants and the header readers (see bench/RESULTS.md, "## analyze").

``--dask ADDRESS`` (repeatable: ``--dask local:1 --dask local:2``) times the same analyze
with the hashing on that cluster, started once and kept for the repeats (its start-up is
printed apart), against the local run. ``--index`` times a first run into an empty
incremental index and a second run over the unchanged models (target: >= 10x faster),
locally and on each ``--dask`` cluster. ``--scale-only`` skips the other comparisons.

Whole processes (issue 15, target <= 1.3x), ``--process-repeat`` times, alternately:
``tdedup analyze --json`` (the console script beside this interpreter, as a user runs it)
and ``python -m tdedup analyze --json`` against a bare process (``python -c``: import blake3,
mmap each weight file and blake3 each tensor's range on all cores; the ranges are read
from a JSON file written beforehand). Interpreter start and imports count on both sides.
Each side's CPU seconds (user + system, from the child's rusage) are printed beside its
wall time: on a loaded machine wall time follows the load, CPU time much less.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import blake3
import numpy as np

from tdedup.analyzers.derivation import derivation_report
from tdedup.analyzers.index import TensorIndex
from tdedup.analyzers.overlap import compute_overlap
from tdedup.analyzers.scan import hash_models, index_models
from tdedup.cli.analyze import analyze_paths, render_json
from tdedup.cli.index import scan_backends

from common import add_corpus_option


def corpus_args(root: Path) -> list[str] | None:
    facts = root / "FACTS.json"
    if not (root / "MANIFEST.sha256").is_file() or not facts.is_file():
        return None
    entries = json.loads(facts.read_text())["models"]
    return [f"{e.replace('/', '-')}={root / e}" for e in entries]


def generate_family(root: Path, gigabytes: float) -> list[str]:
    """A family of >= ``gigabytes`` GB of tensors, written by safetensors and gguf-py."""
    import gguf
    from safetensors.numpy import save_file

    per_model = int(gigabytes * 1e9 / 4)  # four models of equal size
    rng = np.random.default_rng(0)
    shape = (1024, 1024)  # 4 MB tensors, like a mid-sized model's matrices
    n = max(1, -(-per_model // (shape[0] * shape[1] * 4)))
    base = {f"layers.{i}.weight": rng.standard_normal(shape, dtype=np.float32)
            for i in range(n)}
    save_file(base, str(root / "base.safetensors"))
    tuned = {k: (v + np.float32(1e-3) if i % 2 else v) for i, (k, v) in enumerate(base.items())}
    save_file(tuned, str(root / "finetune.safetensors"))
    (root / "sharded").mkdir()
    names = list(base)
    for part, chunk in enumerate((names[: n // 2], names[n // 2:])):
        save_file({k: base[k] for k in chunk}, str(root / "sharded" / f"model-{part}.safetensors"))
    w = gguf.GGUFWriter(root / "base.gguf", "llama")
    w.add_token_list([f"tok{i}" for i in range(50_000)])
    for k, v in base.items():
        w.add_tensor(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return [f"{p.name.replace('.', '-')}={p}"
            for p in (root / "base.safetensors", root / "finetune.safetensors",
                      root / "sharded", root / "base.gguf")]


def tensor_ranges(args: list[str]) -> list[tuple[Path, list[tuple[int, int]]]]:
    models = index_models(args)
    return [(f.abs_path, [(t.offset, t.length) for t in f.tensors])
            for m in models for f in m.weight_files]


def bare_pass(files, threaded_min: int = 0) -> None:
    """blake3 over every tensor's bytes through mmap; nothing else."""
    auto = blake3.blake3.AUTO
    for path, ranges in files:
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            view = memoryview(m)
            for off, n in ranges:
                blake3.blake3(view[off:off + n],
                              max_threads=auto if n >= threaded_min else 1).digest()
            view.release()
            m.close()


def read_pass(files, chunk: int = 16 << 20) -> None:
    """The alternative to mmap: read each tensor into a reused buffer, then hash."""
    buf = bytearray(chunk)
    mv = memoryview(buf)
    for path, ranges in files:
        with open(path, "rb", buffering=0) as f:
            for off, n in ranges:
                h = blake3.blake3(max_threads=blake3.blake3.AUTO)
                f.seek(off)
                while n:
                    got = f.readinto(mv[:min(n, chunk)])
                    h.update(mv[:got])
                    n -= got
                h.digest()


def analyze_pass(args: list[str]) -> dict[str, float]:
    """What the command runs after its imports: hashing and comparing, the derivation
    report (printed by default since issue 15's derivation work) and the JSON."""
    t0 = time.perf_counter()
    scanned, report = analyze_paths(args)
    t1 = time.perf_counter()
    derived = derivation_report(scanned)
    t2 = time.perf_counter()
    render_json(report, None, scanned.models, derived)
    t3 = time.perf_counter()
    return {"analyze": t3 - t0, "derived": t2 - t1, "json": t3 - t2,
            "hashed": scanned.counts.hashed_bytes}


BARE_PROCESS = """
import json, mmap, sys
import blake3
auto = blake3.blake3.AUTO
for path, ranges in json.load(open(sys.argv[1])):
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(m)
        for off, n in ranges:
            blake3.blake3(view[off:off + n], max_threads=auto).hexdigest()
        view.release()
        m.close()
"""


def run_process(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of one child process."""
    # Bytecode cached as on a user's machine (some sandboxes set PYTHONDONTWRITEBYTECODE,
    # which makes every run compile tdedup's sources; the warm-up run writes the cache).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{argv[:4]} exited {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


def whole_processes(args: list[str], files, repeat: int) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([[str(p), rs] for p, rs in files], f)
        ranges = f.name
    sides = {"bare blake3 process": [sys.executable, "-c", BARE_PROCESS, ranges]}
    # What a user types: the console script installed beside this interpreter; and
    # ``python -m tdedup``, which also runs runpy's module search (~9 ms more).
    script = Path(sys.executable).with_name("tdedup")
    if script.is_file():
        sides["tdedup analyze --json"] = [str(script), "analyze", "--json", *args]
    sides["python -m tdedup analyze"] = [sys.executable, "-m", "tdedup", "analyze", "--json",
                                         *args]
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}
    try:
        for argv in sides.values():
            run_process(argv)  # warm-up
        for i in range(repeat):
            for k in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
                res[k].append(run_process(sides[k]))
    finally:
        os.unlink(ranges)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
           for k, v in res.items()}
    print(f"\nwhole processes (medians of {repeat}, load average {os.getloadavg()[0]:.1f}):")
    bw, bc = med["bare blake3 process"]
    for k, (w, c) in med.items():
        ratio = "" if k.startswith("bare") else f"  {w / bw:.3f}x wall, {c / bc:.3f}x cpu"
        print(f"  {k:26s} wall {w:.3f} s (min {min(x for x, _ in res[k]):.3f})  "
              f"cpu {c:.3f} s{ratio}")
    print("target: analyze <= 1.3x the bare process, wall")


def timed(fn, *a, **kw) -> float:
    t = time.perf_counter()
    fn(*a, **kw)
    return time.perf_counter() - t


def stats(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.3f} s  min {min(xs):.3f} s"


def profile(args: list[str], files, repeat: int) -> None:
    print("\nprofile (median of", repeat, "runs):")
    variants = {
        "mmap, all tensors on all cores": lambda: bare_pass(files, 0),
        "mmap, threads from 64 KiB (tdedup)": lambda: bare_pass(files, 1 << 16),
        "mmap, threads from 1 MiB": lambda: bare_pass(files, 1 << 20),
        "read into a 16 MiB buffer": lambda: read_pass(files),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeat):
        for k, fn in variants.items():
            times[k].append(timed(fn))
    for k, xs in times.items():
        print(f"  {k:38s} {statistics.median(xs):.3f} s")
    t = [timed(index_models, args) for _ in range(repeat)]
    print(f"  {'read every header (index_models)':38s} {statistics.median(t):.3f} s")
    ggufs = [p for p, _ in files if p.suffix == ".gguf"]
    if ggufs:
        import gguf

        from tdedup.format.checkpoints.gguf_file import read_gguf
        biggest = max(ggufs, key=lambda p: p.stat().st_size)
        ours = statistics.median(timed(read_gguf, biggest) for _ in range(repeat))
        theirs = timed(gguf.GGUFReader, biggest)
        print(f"  GGUF header of {biggest.name}: tdedup {ours * 1e3:.1f} ms, "
              f"gguf.GGUFReader {theirs * 1e3:.0f} ms")


def analyze_with(args: list[str], index=None, runner=None) -> float:
    """What ``analyze --json [--index] [--dask]`` runs, with the cluster already up."""
    t = time.perf_counter()
    scanned = hash_models(index_models(args), index=index, runner=runner)
    render_json(compute_overlap(scanned.models, scanned.hashed))
    return time.perf_counter() - t


def index_runs(args: list[str], runner, repeat: int) -> tuple[list[float], list[float]]:
    """First run into an empty index, second run over the unchanged models; ``repeat``
    fresh indexes."""
    first, second = [], []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="tdedup-index-") as d, \
                TensorIndex(Path(d) / "tensors.db") as idx:
            first.append(analyze_with(args, idx, runner))
            second.append(analyze_with(args, idx, runner))
    return first, second


def scale(args: list[str], dasks: list[str], with_index: bool, repeat: int) -> None:
    """The ``--dask`` / ``--index`` figures (bench/RESULTS.md, "## analyze at scale")."""
    analyze_with(args)
    local = [analyze_with(args) for _ in range(repeat)]
    base = statistics.median(local)
    print(f"\nanalyze in this process, no index : {stats(local)}")
    if with_index:
        first, second = index_runs(args, None, repeat)
        print(f"  --index, first run (empty index) : {stats(first)}")
        print(f"  --index, second run (unchanged)  : {stats(second)}  -> "
              f"{statistics.median(first) / statistics.median(second):.1f}x faster than "
              f"the first (target >= 10x)")
        with tempfile.TemporaryDirectory(prefix="tdedup-index-") as d:
            cmd = [sys.executable, "-m", "tdedup", "analyze", "--json", "--index",
                   str(Path(d) / "tensors.db"), *args]
            cli = [timed(subprocess.run, cmd, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, check=True) for _ in range(2)]
        print(f"  whole CLI process with --index   : first {cli[0]:.3f} s, second "
              f"{cli[1]:.3f} s ({cli[0] / cli[1]:.1f}x; python start-up and imports "
              "included)")
    for address in dasks:
        t = time.perf_counter()
        with scan_backends(address, None) as (_, runner):
            up = time.perf_counter() - t
            analyze_with(args, runner=runner)  # workers import tdedup, map the files
            times = [analyze_with(args, runner=runner) for _ in range(repeat)]
            print(f"--dask {address} (cluster up in {up:.2f} s): {stats(times)}  -> "
                  f"{statistics.median(times) / base:.2f}x the local run's time")
            if with_index:
                first, second = index_runs(args, runner, repeat)
                print(f"  --index, first run (empty index) : {stats(first)}")
                print(f"  --index, second run (unchanged)  : {stats(second)}  -> "
                      f"{statistics.median(first) / statistics.median(second):.1f}x faster")
        print(f"  cluster down; start-up + {repeat} runs + shutdown "
              f"{time.perf_counter() - t:.1f} s")


def compare_with_bare(args: list[str], files, nbytes: int, repeat: int) -> None:
    """The analyze/bare ratio, as bench/RESULTS.md "## analyze" has it."""
    hashed = analyze_pass(args)["hashed"]
    bare, full, js, der = [], [], [], []
    for i in range(repeat):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            if which == 0:
                r = analyze_pass(args)
                full.append(r["analyze"])
                js.append(r["json"])
                der.append(r["derived"])
            else:
                bare.append(timed(bare_pass, files))
    ratio = statistics.median(full) / statistics.median(bare)
    print(f"bare blake3 pass : {stats(bare)}  "
          f"({nbytes / statistics.median(bare) / 1e9:.2f} GB/s)")
    print(f"tdedup analyze   : {stats(full)}  (of which derivation report "
          f"{statistics.median(der):.3f} s, JSON {statistics.median(js):.3f} s; "
          f"hashed in full {hashed / 1e9:.2f} of {nbytes / 1e9:.2f} GB, the rest screened)")
    print(f"ratio analyze/bare (medians): {ratio:.3f}x   (target <= 1.1x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_corpus_option(ap)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--generate-gb", type=float, default=1.2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--process-repeat", type=int, default=7,
                    help="runs per side of the whole-process comparison (0: skip)")
    ap.add_argument("--dask", action="append", default=[], metavar="ADDRESS",
                    help="also time the hashing on this Dask cluster (repeatable)")
    ap.add_argument("--index", action="store_true",
                    help="also time a first and a second run with an incremental index")
    ap.add_argument("--scale-only", action="store_true",
                    help="only the --dask / --index figures")
    opts = ap.parse_args()

    tmp = None
    args = corpus_args(opts.corpus)
    source = f"corpus at {opts.corpus}"
    if args is None:
        tmp = tempfile.TemporaryDirectory(prefix="tdedup-bench-")
        t = time.perf_counter()
        args = generate_family(Path(tmp.name), opts.generate_gb)
        source = f"generated family in {tmp.name} ({time.perf_counter() - t:.1f} s to write)"
    files = tensor_ranges(args)
    nbytes = sum(n for _, rs in files for _, n in rs)
    print(f"{len(args)} models, {sum(len(rs) for _, rs in files)} tensors, "
          f"{nbytes / 1e9:.2f} GB of tensors; {source}")
    print(f"{os.cpu_count()} CPUs, blake3 {blake3.__version__}, python "
          f"{sys.version.split()[0]}")

    bare_pass(files)  # warm the page cache for both
    if not opts.scale_only:
        compare_with_bare(args, files, nbytes, opts.repeat)
        if opts.process_repeat:
            whole_processes(args, files, opts.process_repeat)
        if opts.profile:
            profile(args, files, opts.repeat)
    if opts.dask or opts.index:
        scale(args, opts.dask, opts.index, opts.repeat)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
