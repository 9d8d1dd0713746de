"""The operations: pack, unpack, verify. They sit above the format (readers, codecs,
bundle container) and the analyzers (hashing, planning), and below the CLI."""

from __future__ import annotations

from collections.abc import Callable

#: Progress callbacks of long operations: ``(phase, bytes advanced, phase total)``.
ProgressFn = Callable[[str, int, int], None]
