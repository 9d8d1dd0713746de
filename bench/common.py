"""What every benchmark here shares: where the real-checkpoint corpus is.

The benchmarks run as scripts (``python bench/NAME.py``), so this folder is on their
import path and ``from common import ...`` finds this module."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

#: shared/corpus/build.sh's output: ``$TDEDUP_CORPUS``, else ~/.cache/tdedup-corpus.
CORPUS = Path(os.environ.get("TDEDUP_CORPUS") or Path.home() / ".cache" / "tdedup-corpus")


def add_corpus_option(parser: argparse.ArgumentParser) -> None:
    """``--corpus DIR``, defaulting to :data:`CORPUS`."""
    parser.add_argument("--corpus", type=Path, default=CORPUS,
                        help=f"the real-checkpoint corpus (default: {CORPUS})")
