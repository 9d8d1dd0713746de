"""Start-up time of the ``tdedup`` CLI: whole processes, as a user types them.

Each row is a fresh interpreter (``python -m tdedup ...``), run ``--repeat`` times,
alternating with the baselines so that load on the machine hits every row alike:

* ``python -c pass``: the interpreter's own start (the floor);
* a bare typer app with two commands, ``--help``: the floor of the CLI framework
  (typer + rich render the help; tdedup cannot go below it without leaving typer);
  (its ``a --help`` row: a command's help, where typer also imports its adapters);
* ``tdedup --help``, ``tdedup --version``, ``tdedup pack --help``, ``tdedup analyze --help``.

Prints median and minimum per row and the ratio of medians to the bare typer app.
``--importtime`` adds the ten slowest imports of ``tdedup --help`` (``python -X importtime``).

    python bench/startup.py --repeat 21
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARE_TYPER = '''
import typer
app = typer.Typer(add_completion=False)
@app.command()
def a(x: int = 1):
    "First."
@app.command()
def b(x: int = 1):
    "Second."
app()
'''


def run_once(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True)
    return time.perf_counter() - t0


def slowest_imports(env: dict[str, str], n: int = 10) -> list[tuple[int, str]]:
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "tdedup", "--help"],
                         env=env, capture_output=True, text=True, check=True).stderr
    rows = []
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].rstrip()))
    return sorted(rows, reverse=True)[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=21)
    ap.add_argument("--importtime", action="store_true")
    args = ap.parse_args()

    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["NO_COLOR"] = "1"
    # What a user's machine does: bytecode cached after the warm-up run (some sandboxes set
    # PYTHONDONTWRITEBYTECODE, which makes every run compile tdedup's sources again).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(BARE_TYPER)
        bare = f.name
    py = sys.executable
    rows = {
        "python -c pass": [py, "-c", "pass"],
        "bare typer app --help": [py, bare, "--help"],
        "bare typer app a --help": [py, bare, "a", "--help"],
        "tdedup --help": [py, "-m", "tdedup", "--help"],
        "tdedup --version": [py, "-m", "tdedup", "--version"],
        "tdedup pack --help": [py, "-m", "tdedup", "pack", "--help"],
        "tdedup analyze --help": [py, "-m", "tdedup", "analyze", "--help"],
    }
    times: dict[str, list[float]] = {k: [] for k in rows}
    try:
        for argv in rows.values():  # warm the page cache and .pyc files
            run_once(argv, env)
        for _ in range(args.repeat):
            for name, argv in rows.items():
                times[name].append(run_once(argv, env))
    finally:
        os.unlink(bare)
    ref = statistics.median(times["bare typer app --help"])
    print(f"load average {os.getloadavg()[0]:.2f}, {args.repeat} runs per row")
    print("| command | median ms | min ms | vs bare typer --help |")
    print("| --- | ---: | ---: | ---: |")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| `{name}` | {med * 1e3:.0f} | {min(ts) * 1e3:.0f} | {med / ref:.2f}x |")
    if args.importtime:
        print("\nslowest imports of `tdedup --help` (cumulative µs):")
        for us, name in slowest_imports(env):
            print(f"  {us:>8}  {name}")


if __name__ == "__main__":
    main()
