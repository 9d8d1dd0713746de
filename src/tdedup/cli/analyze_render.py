"""How ``tdedup analyze`` shows a report to people: rich tables, or Markdown for CI.

Both renderings show the same sections (models, pair matrix, largest shared groups,
view mismatches, totals) from one :class:`OverlapReport`; the terminal shows the totals
last, where they stay in view, Markdown first, where a CI summary is read from the top.
The JSON form is ``OverlapReport.to_dict``.

Every string from a file, path or manifest goes through ``common.clean`` (rich) or
:func:`md_escape` (Markdown): :func:`clean`'s escapes of control characters, plus the
bidirectional controls (U+202E and the like) and line separators, which would reorder
or break what a terminal or a Markdown viewer shows ("Trojan Source" names).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .common import clean, human_bytes, plain

if TYPE_CHECKING:  # drift imports numpy and the delta planner: only --drift needs them
    from ..analyzers.derivation import DerivableModel
    from ..analyzers.drift import DriftReport
    from ..analyzers.overlap import OverlapReport, SharedGroup

# Tensor names listed per group before "+N more": a group of 18 copies would not fit.
_NAMES_SHOWN = 3


def share(fraction: float, digits: int = 0) -> str:
    """A fraction as a percent with ``digits`` decimals, never rounded to look like none
    or all of it (``<1%``, ``>99%``; ``<0.1%``, ``>99.9%``): the one convention of every
    table and of Markdown."""
    pct, step = 100 * fraction, 10.0 ** -digits
    if 0 < pct < step:
        return f"<{step:.{digits}f}%"
    if 100 - step < pct < 100:
        return f">{100 - step:.{digits}f}%"
    return f"{pct:.{digits}f}%"


def _pct(part: int, whole: int) -> str:
    """``part`` of ``whole`` as a whole percent (:func:`share`); ``-`` of nothing."""
    return share(part / whole) if whole else "-"


def _ratio(report: OverlapReport) -> str:
    return f"{report.dedup_ratio:.2f}x"


#: Decimals of ``dedup_ratio`` in the JSON report (``OverlapReport.to_dict``): the value
#: ``--min-dedup-ratio`` compares and its messages print.
RATIO_DECIMALS = 6


def reported_ratio(report: OverlapReport) -> float:
    """The dedup ratio as the JSON report gives it (rounded to :data:`RATIO_DECIMALS`)."""
    return round(report.dedup_ratio, RATIO_DECIMALS)


def exact_number(x: float) -> str:
    """``x`` with every digit it has (its shortest repr), no trailing ``.0``: a ratio and
    a threshold printed side by side never look equal when they are not."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def below_threshold(report: OverlapReport, min_ratio: float) -> bool:
    """Whether the reported ratio fails ``--min-dedup-ratio``."""
    return reported_ratio(report) < min_ratio


def totals_rows(report: OverlapReport) -> list[tuple[str, str]]:
    """(label, value) lines of the totals section."""
    return [
        ("models", str(len(report.models))),
        ("tensors", f"{report.total_tensors} ({report.distinct_tensors} distinct)"),
        ("logical tensor bytes", human_bytes(report.total_tensor_bytes)),
        ("distinct tensor bytes", human_bytes(report.distinct_tensor_bytes)),
        ("dedup ratio", _ratio(report)),
        ("a deduplicated store saves", f"{human_bytes(report.saved_bytes)} "
                                       f"({_pct(report.saved_bytes, report.total_tensor_bytes)})"),
    ]


def group_names(group: SharedGroup) -> str:
    """``name (model, model)`` for each distinct tensor name of a group, shortened."""
    by_name: dict[str, list[str]] = {}
    for o in group.occurrences:
        models = by_name.setdefault(o.name, [])
        if o.model not in models:
            models.append(o.model)
    parts = [f"{name} ({', '.join(models)})" for name, models in by_name.items()]
    if len(parts) > _NAMES_SHOWN:
        parts = parts[:_NAMES_SHOWN] + [f"+{len(parts) - _NAMES_SHOWN} more"]
    return "; ".join(parts)


def view_list(group: SharedGroup) -> str:
    """``F16[32] in a, b; BF16[32] in c``: the views of byte-identical tensors."""
    out = []
    for dtype, shape in group.views:
        models = dict.fromkeys(o.model for o in group.occurrences
                               if (o.dtype, tuple(o.shape)) == (dtype, shape))
        out.append(f"{dtype}{list(shape)} in {', '.join(models)}")
    return "; ".join(out)


def _shown_groups(report: OverlapReport, top: int) -> list[SharedGroup]:
    # Groups of empty tensors save nothing and would only crowd the list.
    return [g for g in report.groups if g.saved_bytes > 0][:top]


def _matrix_cell(report: OverlapReport, a: str, b: str, size: int) -> tuple[int, str]:
    shared = report.pair(a, b).shared_bytes
    return shared, _pct(shared, size)


# -- rich -----------------------------------------------------------------------------

#: Above this many models the pair matrix is a ranked list of pairs (a matrix of n²
#: cells stops being readable long before it stops fitting).
MATRIX_MAX_MODELS = 6
#: Model names up to this long keep their column wide enough at any terminal width.
NAME_WIDTH = 24
#: Below this width the drift table keeps its essential columns only.
DRIFT_FULL_WIDTH = 120
#: Pairs listed, largest sharing first.
PAIRS_SHOWN = 20
#: Layer names up to this long are shown whole; longer ones lose their start, never
#: their end, where the layer number and the tensor's role are.
LAYER_WIDTH = 40


def matrix_fits(report: OverlapReport, width: int) -> bool:
    """Whether the pair matrix is readable: few models, and every cell fits the width."""
    n = len(report.models)
    label = max(len(f"#{n} {m.name}") for m in report.models)
    return n <= MATRIX_MAX_MODELS and label + 4 + n * 11 <= width


def print_pairs(report: OverlapReport, console: Console) -> None:
    """The pairs of models that share bytes, most first, as a list."""
    sizes = {m.name: m.tensor_bytes for m in report.models}
    pairs = sorted(((report.pair(a.name, b.name).shared_bytes, a.name, b.name)
                    for i, a in enumerate(report.models) for b in report.models[i + 1:]),
                   key=lambda p: -p[0])
    pairs = [p for p in pairs if p[0]]
    table = Table()
    name_width = min(NAME_WIDTH, max(len(m.name) for m in report.models))
    for col, just in (("model", "left"), ("model", "left"), ("shared bytes", "right"),
                      ("of first (%)", "right"), ("of second (%)", "right")):
        table.add_column(col, justify=just, no_wrap=just == "right",
                         min_width=name_width if col == "model" else None)
    for shared, a, b in pairs[:PAIRS_SHOWN]:
        table.add_row(plain(a), plain(b), human_bytes(shared), _pct(shared, sizes[a]),
                      _pct(shared, sizes[b]))
    more = f"; {len(pairs) - PAIRS_SHOWN} more not shown" if len(pairs) > PAIRS_SHOWN else ""
    _section(console, "Pairs of models that share bytes",
             f"{len(pairs)} of {len(report.models) * (len(report.models) - 1) // 2} pairs, "
             f"most shared first{more}")
    console.print(table)


def layer_label(name: str, width: int = LAYER_WIDTH) -> str:
    """``name``, or its last ``width`` characters after an ellipsis: the end holds the layer
    number and the tensor's role, the start only the model's prefix."""
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _section(console: Console, title: str, note: str = "") -> None:
    # A heading line rather than a table title: rich wraps titles to the table's width.
    console.print(plain(title, "bold") + (plain(f"  ({note})", "dim") if note else Text()))


def print_report(report: OverlapReport, console: Console, *, top: int = 10) -> None:
    """Print the report as rich tables (to the data console: stdout)."""
    totals = Table(show_header=False)
    totals.add_column(style="bold")
    totals.add_column(justify="right")
    for label, value in totals_rows(report):
        totals.add_row(plain(label), plain(value))

    models = Table(collapse_padding=True)
    name_width = min(NAME_WIDTH, max(len(m.name) for m in report.models)) if report.models else 5
    for col, just in (("#", "right"), ("model", "left"), ("layout", "left"),
                      ("tensors", "right"), ("tensor\nbytes", "right"),
                      ("shared\nbytes", "right"), ("unique\nbytes", "right"),
                      ("shared\n(%)", "right")):
        models.add_column(col, justify=just, no_wrap=just == "right",
                          min_width=name_width if col == "model" else None,
                          overflow="ellipsis" if col == "layout" else "fold")
    for i, m in enumerate(report.models, 1):
        models.add_row(str(i), plain(m.name), plain(str(m.layout)), str(m.tensors), human_bytes(m.tensor_bytes),
                       human_bytes(m.shared_bytes), human_bytes(m.unique_bytes),
                       _pct(m.shared_bytes, m.tensor_bytes))
    _section(console, "Models")
    console.print(models)

    if len(report.models) > 1 and not matrix_fits(report, console.width):
        print_pairs(report, console)
    elif len(report.models) > 1:
        matrix = Table()
        matrix.add_column("")
        for i in range(1, len(report.models) + 1):
            matrix.add_column(f"#{i}", justify="right")
        for i, a in enumerate(report.models, 1):
            cells = []
            for b in report.models:
                if a.name == b.name:
                    cells.append("-")
                    continue
                shared, pct = _matrix_cell(report, a.name, b.name, a.tensor_bytes)
                cells.append(f"{pct}\n{human_bytes(shared)}" if shared else "·")
            matrix.add_row(plain(f"#{i} {a.name}"), *cells)
        _section(console, "Shared bytes between models",
                 "row %: share of the row model's tensor bytes that the column model holds")
        console.print(matrix)

    shown = _shown_groups(report, top)
    if shown:
        groups = Table()
        for col, just in (("bytes each", "right"), ("copies", "right"),
                          ("bytes saved", "right"), ("tensor (models)", "left")):
            groups.add_column(col, justify=just)
        for g in shown:
            groups.add_row(human_bytes(g.bytes), str(g.count), human_bytes(g.saved_bytes),
                           plain(group_names(g)))
        _section(console, f"Largest shared tensors (top {len(shown)} of "
                          f"{sum(g.saved_bytes > 0 for g in report.groups)})")
        console.print(groups)

    mismatches = report.view_mismatches
    if mismatches:
        table = Table()
        for col, just in (("hash", "left"), ("bytes", "right"), ("views", "left")):
            table.add_column(col, justify=just)
        for g in mismatches:
            table.add_row(g.hash[:12], human_bytes(g.bytes), plain(view_list(g)))
        _section(console, "Byte-identical tensors stored as different dtypes or shapes")
        console.print(table)
    _section(console, "Totals")
    console.print(totals)  # last, where a terminal leaves it in view


# -- markdown -------------------------------------------------------------------------


#: What would break a Markdown table cell or start formatting: a link or image
#: (``[text](url)``), emphasis, code, HTML, a character reference (``&#x202e;``),
#: strikethrough. The backslash first, so that the escapes added are not escaped again.
_MD_SPECIAL = ("\\", "|", "*", "_", "`", "<", ">", "[", "]", "&", "~")


def md_escape(text: object) -> str:
    """Escape what would break a Markdown table cell or start formatting (and control
    characters, surrogates, bidirectional controls: see ``common.clean``)."""
    text = clean(text)
    for ch in _MD_SPECIAL:
        text = text.replace(ch, "\\" + ch)
    return text


def _md_table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join("---:" if i in right else "---" for i in range(len(header)))
             + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def markdown_report(report: OverlapReport, *, top: int = 10,
                    min_ratio: float | None = None,
                    skipped: dict[str, list[str]] | None = None) -> str:
    """The report as GitHub-flavoured Markdown, fit for a CI job summary: a ``##`` title,
    every section ``###`` below it (those of drift and derivation too)."""
    out = ["## tdedup analyze", ""]
    if min_ratio is not None:
        ok = not below_threshold(report, min_ratio)
        out += [f"**{'Passed' if ok else 'Failed'}**: dedup ratio "
                f"{exact_number(reported_ratio(report))}x {'>=' if ok else '<'} required "
                f"{exact_number(min_ratio)}x", ""]
    out += _md_table(["total", "value"], [[a, md_escape(b)] for a, b in totals_rows(report)], {1})
    out += ["", "### Models", ""]
    out += _md_table(
        ["#", "model", "layout", "tensors", "tensor bytes", "shared", "unique", "shared %"],
        [[str(i), md_escape(m.name), str(m.layout), str(m.tensors), human_bytes(m.tensor_bytes),
          human_bytes(m.shared_bytes), human_bytes(m.unique_bytes),
          _pct(m.shared_bytes, m.tensor_bytes)] for i, m in enumerate(report.models, 1)],
        {0, 3, 4, 5, 6, 7})
    if len(report.models) > 1:
        out += ["", "### Shared bytes between models", "",
                "Row %: share of the row model's tensor bytes that the column model also "
                "holds.", ""]
        rows = []
        for i, a in enumerate(report.models, 1):
            cells = [f"#{i} {md_escape(a.name)}"]
            for b in report.models:
                if a.name == b.name:
                    cells.append("-")
                else:
                    shared, pct = _matrix_cell(report, a.name, b.name, a.tensor_bytes)
                    cells.append(f"{human_bytes(shared)} ({pct})" if shared else "0")
            rows.append(cells)
        out += _md_table(["model"] + [f"#{i}" for i in range(1, len(report.models) + 1)],
                         rows, set(range(1, len(report.models) + 1)))
    shown = _shown_groups(report, top)
    if shown:
        out += ["", f"### Largest shared tensors (top {len(shown)})", ""]
        out += _md_table(["size", "copies", "saves", "tensor (models)"],
                         [[human_bytes(g.bytes), str(g.count), human_bytes(g.saved_bytes),
                           md_escape(group_names(g))] for g in shown], {0, 1, 2})
    if report.view_mismatches:
        out += ["", "### Byte-identical tensors stored as different dtypes or shapes", ""]
        out += _md_table(["hash", "size", "views"],
                         [[f"`{g.hash[:12]}`", human_bytes(g.bytes), md_escape(view_list(g))]
                          for g in report.view_mismatches], {1})
    if skipped:
        out += ["", "### Skipped (not read)", ""]
        out += _md_table(["model", "entry (why)"],
                         [[md_escape(name), md_escape(entry)]
                          for name, entries in skipped.items() for entry in entries], set())
    return "\n".join(out) + "\n"


def drift_table(report: DriftReport, *, max_rows: int = 60, width: int | None = None
                ) -> Table:
    """A rich ``Table`` of the per-layer drift, with the size estimate as its caption.
    Below ``DRIFT_FULL_WIDTH`` columns (``width``) only the essential columns are kept,
    so that names and numbers are never cut."""
    full = width is None or width >= DRIFT_FULL_WIDTH
    table = Table(title="Drift of differing tensors, by layer", title_justify="left")
    rows = report.layers[:max_rows]
    layer_width = min(LAYER_WIDTH, max((len(g.layer) for g in rows), default=5))
    name_width = min(NAME_WIDTH, max((len(n) for g in rows for n in (g.model, g.reference)),
                                     default=5))
    columns = [("model", {"min_width": name_width}), ("vs", {"min_width": name_width}),
               ("layer", {"no_wrap": True, "min_width": layer_width}),
               ("tensors", {"justify": "right"}), ("bytes", {"justify": "right"}),
               ("bytes changed (%)", {"justify": "right"}),
               ("elements changed (%)", {"justify": "right"}),
               ("rel. L2 (ratio)", {"justify": "right"}),
               ("planes changed (%, high..low)", {})]
    keep = [0, 1, 2, 5, 7] if not full else list(range(len(columns)))
    for i in keep:
        table.add_column(columns[i][0], **columns[i][1])
    for g in rows:
        planes = " ".join(share(p) for p in reversed(g.planes_changed))
        cells = [plain(g.model), plain(g.reference), plain(layer_label(g.layer)),
                 str(g.tensors), human_bytes(g.bytes), share(g.bytes_changed, 1),
                 share(g.elements_changed, 1),
                 "-" if g.rel_l2 is None else f"{g.rel_l2:.2e}", planes]
        table.add_row(*[cells[i] for i in keep])
    if len(report.layers) > max_rows:
        table.add_row("...", "", f"{len(report.layers) - max_rows} more", *[""] * (len(keep) - 3))
    e = report.estimate
    if e:
        table.caption = (f"estimated bundle tensors: {human_bytes(e['with_deltas_bytes'])} with "
                         f"deltas, {human_bytes(e['without_deltas_bytes'])} without "
                         f"({e['ratio_vs_without_deltas']:.2f}x); {e['delta_blobs']} deltas")
        table.caption_justify = "left"
    return table



def derived_table(rows: list[DerivableModel]) -> Table:
    """A rich ``Table`` of the bytes per model that another model's tensors compute."""
    table = Table(title="Derivable from another model (cast, quantization, ...)",
                  title_justify="left")
    for col, kw in (("model", {}), ("derivable", {"justify": "right"}),
                    ("of its tensors", {"justify": "right"}), ("from", {}), ("by", {})):
        table.add_column(col, **kw)
    for d in rows:
        table.add_row(plain(d.model), human_bytes(d.derivable_bytes),
                      _pct(d.derivable_bytes, d.tensor_bytes),
                      plain(d.base_model), plain(d.transform))
    return table


def derived_markdown(rows: list[DerivableModel]) -> str:
    """The Markdown section of :func:`derived_table`."""
    lines = ["", "### Derivable from another model", ""]
    lines += _md_table(["model", "derivable", "of its tensors", "from", "by"],
                       [[md_escape(d.model), human_bytes(d.derivable_bytes),
                         _pct(d.derivable_bytes, d.tensor_bytes),
                         md_escape(d.base_model), md_escape(d.transform)] for d in rows], {1, 2})
    return "\n".join(lines) + "\n"
