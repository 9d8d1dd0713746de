"""``--dask`` errors after the third QA pass: the LocalCluster tdedup starts prints no worker
traceback of its own, and the shared-file-system hint comes only with a file a worker
cannot open at all, not with one that changed (shrank) while it was hashed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from helpers.factory import make_safetensors, random_tensors

pytest.importorskip("distributed")

SCRIPT = textwrap.dedent("""
    import sys
    from tdedup.analyzers.distributed import dask_runner
    from tdedup.analyzers.work_units import FileStamp, HashUnit
    from tdedup.errors import TdedupError

    path, missing = sys.argv[1], sys.argv[2]
    stamp = FileStamp.of(path)
    units = {"shrank": HashUnit(path, stamp, 0, ((0, 1 << 20),)),  # past the end
             "missing": HashUnit(missing, stamp, 0, ((0, 8),))}
    with dask_runner("local:1") as runner:
        for what, unit in units.items():
            try:
                list(runner([unit]))
            except TdedupError as e:
                print(what, "|", e.message, "|", e.hint)
""")


def test_worker_errors_are_one_line_with_the_right_hint(tmp_path):
    path = make_safetensors(tmp_path / "m.safetensors", random_tensors(0, {"x": (64,)}))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path),
                           str(tmp_path / "gone.safetensors")],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no "distributed.worker - ERROR - Compute Failed" traceback
    lines = dict(line.split(" | ", 1) for line in proc.stdout.strip().splitlines())
    shrank_message, shrank_hint = lines["shrank"].split(" | ")
    assert "m.safetensors" in shrank_message and "shrank" in shrank_message
    assert shrank_hint == "None"
    missing_message, missing_hint = lines["missing"].split(" | ")
    assert "gone.safetensors" in missing_message and "cannot open" in missing_message
    assert "shared file system" in missing_hint
