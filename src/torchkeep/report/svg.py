"""Inline SVG for the run report: line charts, a treemap, a heat map. Strings only, every label escaped.

Layout is pure arithmetic (:func:`squarify` works on plain numbers), so the page needs no script and no
library, and renders the same offline in any browser.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from torchkeep.report.collect import ModuleSize
from torchkeep.weights.diff import DiffReport
from torchkeep.weights.inspect import human_bytes

# Tableau 10: distinct hues for the treemap's top-level modules, repeated past ten.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
LINE_COLOUR = "#1f6fb4"
BEST_COLOUR = "#d62728"
UNCHANGED_COLOUR = "#e6e6e6"
# Relative change ||a-b|| / ||a|| is coloured on a log scale from 1e-6 (pale) to 1 and more (dark red).
CHANGE_STOPS = ((255, 237, 160), (253, 141, 60), (189, 0, 38))
CHANGE_DECADES = 6
CHAR_WIDTH = 6.4  # px per character of the 11px sans-serif labels, to decide what fits
# Bounds on what is drawn, so a model with thousands of modules still gives a page a browser opens quickly.
MAX_TREEMAP_LEAVES = 300
MAX_HEAT_ROWS = 200
MAX_HEAT_CELLS = 24


@dataclass(frozen=True)
class Box:
    x: float
    y: float
    w: float
    h: float


def _worst_ratio(row: Sequence[float], side: float) -> float:
    total = sum(row)
    return max(max(side * side * a / (total * total), total * total / (side * side * a)) for a in row)


def squarify(values: Sequence[float], box: Box) -> list[Box]:
    """Rectangles tiling ``box`` with areas proportional to ``values`` (positive, largest first), in order.

    The squarified layout (Bruls, Huizing, van Wijk 2000): a row grows along the box's short side while
    that keeps its worst aspect ratio from getting worse.
    """
    total = sum(values)
    if not values or total <= 0 or box.w <= 0 or box.h <= 0:
        return [Box(box.x, box.y, 0.0, 0.0) for _ in values]
    areas = [v * box.w * box.h / total for v in values]
    x, y, w, h = box.x, box.y, box.w, box.h
    out: list[Box] = []
    i = 0
    while i < len(areas):
        side = min(w, h)
        row = [areas[i]]
        while i + len(row) < len(areas) and _worst_ratio([*row, areas[i + len(row)]], side) <= _worst_ratio(row, side):
            row.append(areas[i + len(row)])
        thickness = sum(row) / side
        offset = 0.0
        for area in row:
            length = area / thickness
            out.append(Box(x, y + offset, thickness, length) if w >= h else Box(x + offset, y, length, thickness))
            offset += length
        if w >= h:  # the row filled a column on the left
            x, w = x + thickness, w - thickness
        else:  # a row along the top
            y, h = y + thickness, h - thickness
        i += len(row)
    return out


def fit(text: str, width: float) -> str:
    """``text`` cut to what fits in ``width`` px (with an ellipsis), or "" when nothing useful fits."""
    room = int((width - 6) / CHAR_WIDTH)
    if room >= len(text):
        return text
    return text[: room - 1] + "…" if room >= 4 else ""


def natural_key(text: str) -> list[tuple[int, int | str]]:
    """Sorts "layers.2" before "layers.10"."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text)]


def _num(value: float) -> str:
    return f"{value:.1f}"


def _svg(width: float, height: float, label: str, body: Sequence[str]) -> str:
    return (
        # no xmlns: inline in HTML the parser puts <svg> in the SVG namespace, and the page names no URL
        f'<svg viewBox="0 0 {_num(width)} {_num(height)}" width="{_num(width)}" '
        f'height="{_num(height)}" role="img" aria-label="{escape(label)}">' + "".join(body) + "</svg>"
    )


def line_chart(metric: str, points: Sequence[tuple[int, float]], *, best_step: int | None = None) -> str:
    """One metric across steps: a line with a dot per checkpoint (hover for the value); the best one in red."""
    width, height, left, right, top, bottom = 420.0, 220.0, 62.0, 14.0, 14.0, 34.0
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    lo, hi = min(values), max(values)
    if lo == hi:  # a flat line: give it room above and below
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    first, last = min(steps), max(steps)
    plot_w, plot_h = width - left - right, height - top - bottom

    def x_of(step: int) -> float:
        return left + plot_w / 2 if first == last else left + (step - first) / (last - first) * plot_w

    def y_of(value: float) -> float:
        return top + (hi - value) / (hi - lo) * plot_h

    body = [f'<rect x="{_num(left)}" y="{_num(top)}" width="{_num(plot_w)}" height="{_num(plot_h)}" class="plot"/>']
    for value in (lo, (lo + hi) / 2, hi):
        y = y_of(value)
        body.append(f'<line x1="{_num(left)}" x2="{_num(left + plot_w)}" y1="{_num(y)}" y2="{_num(y)}" class="grid"/>')
        body.append(f'<text x="{_num(left - 6)}" y="{_num(y + 4)}" text-anchor="end">{value:.3g}</text>')
    for step in sorted({first, last}):
        body.append(f'<text x="{_num(x_of(step))}" y="{_num(height - bottom + 16)}" text-anchor="middle">{step}</text>')
    body.append(f'<text x="{_num(left + plot_w / 2)}" y="{_num(height - 4)}" text-anchor="middle">step</text>')
    path = " ".join(f"{_num(x_of(s))},{_num(y_of(v))}" for s, v in points)
    body.append(f'<polyline points="{path}" fill="none" stroke="{LINE_COLOUR}" stroke-width="2"/>')
    for step, value in points:
        best = step == best_step
        colour = BEST_COLOUR if best else LINE_COLOUR
        note = " (best)" if best else ""
        body.append(
            f'<circle cx="{_num(x_of(step))}" cy="{_num(y_of(value))}" r="{5 if best else 3.5}" fill="{colour}">'
            f"<title>step {step}: {escape(metric)} = {value:.6g}{note}</title></circle>"
        )
    return _svg(width, height, f"{metric} by step", body)


def treemap(modules: Sequence[ModuleSize], *, width: float = 960.0, height: float = 420.0) -> str:
    """Bytes by module: one coloured block per top-level module, split into its sub-modules."""
    ranked = sorted((m for m in modules if m.nbytes > 0), key=lambda m: (-m.nbytes, natural_key(m.module)))
    shown, rest = ranked[:MAX_TREEMAP_LEAVES], ranked[MAX_TREEMAP_LEAVES:]
    groups: dict[str, list[tuple[str, int, str, str]]] = {}  # top-level name -> (label, bytes, tooltip, module)
    for m in shown:
        top, _, below = m.module.partition(".")
        tip = f"{m.module}: {human_bytes(m.nbytes)}, {m.params:,} parameters in {m.tensors} tensor(s)"
        groups.setdefault(top, []).append((below or top, m.nbytes, tip, m.module))
    if rest:
        total = sum(m.nbytes for m in rest)
        label = f"({len(rest)} smaller modules)"
        groups[label] = [(label, total, f"{label}: {human_bytes(total)}", label)]
    order = sorted(groups, key=lambda g: -sum(leaf[1] for leaf in groups[g]))
    body: list[str] = []
    outer = squarify([sum(leaf[1] for leaf in groups[g]) for g in order], Box(0, 0, width, height))
    for index, (group, box) in enumerate(zip(order, outer, strict=True)):
        colour = PALETTE[index % len(PALETTE)]
        size = sum(leaf[1] for leaf in groups[group])
        body.append(
            f'<g class="group"><rect x="{_num(box.x)}" y="{_num(box.y)}" width="{_num(box.w)}" height="{_num(box.h)}" '
            f'fill="{colour}" class="outer"><title>{escape(group)}: {human_bytes(size)}</title></rect>'
        )
        header = 16.0 if box.h > 40 and box.w > 40 else 0.0
        if header:
            text = fit(f"{group} · {human_bytes(size)}", box.w)
            body.append(f'<text x="{_num(box.x + 4)}" y="{_num(box.y + 12)}" class="head">{escape(text)}</text>')
        inner = Box(box.x + 2, box.y + header + 1, max(box.w - 4, 0), max(box.h - header - 3, 0))
        leaves = groups[group]
        for (label, size, tip, module), leaf in zip(leaves, squarify([x[1] for x in leaves], inner), strict=True):
            body.append(
                f'<rect x="{_num(leaf.x)}" y="{_num(leaf.y)}" width="{_num(leaf.w)}" height="{_num(leaf.h)}" '
                f'fill="{colour}" class="leaf" data-module="{escape(module)}" data-bytes="{size}">'
                f"<title>{escape(tip)}</title></rect>"
            )
            text = fit(label, leaf.w) if leaf.h >= 16 and len(leaves) > 1 else ""
            if text:
                body.append(f'<text x="{_num(leaf.x + 3)}" y="{_num(leaf.y + 12)}">{escape(text)}</text>')
        body.append("</g>")
    return _svg(width, height, "parameter bytes by module", body)


def change_colour(relative: float) -> str:
    """The heat-map colour of a relative change: grey when unchanged, pale to dark red from 1e-6 to 1."""
    if relative == 0:
        return UNCHANGED_COLOUR
    if math.isnan(relative) or math.isinf(relative):
        return "#67000d"
    t = min(max((math.log10(relative) + CHANGE_DECADES) / CHANGE_DECADES, 0.0), 1.0) * (len(CHANGE_STOPS) - 1)
    low = min(int(t), len(CHANGE_STOPS) - 2)
    a, b = CHANGE_STOPS[low], CHANGE_STOPS[low + 1]
    mix = t - low
    return "#" + "".join(f"{round(x + (y - x) * mix):02x}" for x, y in zip(a, b, strict=True))


def heatmap(report: DiffReport) -> str:
    """One row per module (in the model's order): a cell per tensor coloured by its relative change."""
    rows = [
        (module, [(t.name.rpartition(".")[2], t.relative) for t in tensors])
        for module, tensors in list(report.grouped().items())[:MAX_HEAT_ROWS]
    ]
    label_w, cell, row_h, top = 240.0, 26.0, 20.0, 28.0
    cells = min(max((len(tensors) for _, tensors in rows), default=1), MAX_HEAT_CELLS)
    width = label_w + max(cells * (cell + 2), 200) + 110  # room for the column headings
    height = top + len(rows) * row_h + 4
    body = [
        '<text x="0" y="14" class="head">module</text>',
        f'<text x="{_num(label_w)}" y="14" class="head">tensors (hover: name, change)</text>',
        f'<text x="{_num(width - 4)}" y="14" class="head" text-anchor="end">max change</text>',
    ]
    for index, (module, tensors) in enumerate(rows):
        y = top + index * row_h
        worst = max(relative for _, relative in tensors)
        body.append(f'<g class="row" data-module="{escape(module)}" data-change="{worst!r}">')
        body.append(
            f'<text x="0" y="{_num(y + 14)}"><title>{escape(module)}</title>{escape(fit(module, label_w))}</text>'
        )
        for column, (leaf, relative) in enumerate(tensors[:MAX_HEAT_CELLS]):
            body.append(
                f'<rect x="{_num(label_w + column * (cell + 2))}" y="{_num(y + 2)}" width="{_num(cell)}" '
                f'height="{_num(row_h - 4)}" fill="{change_colour(relative)}" class="cell">'
                f"<title>{escape(module)}.{escape(leaf)}: {relative:.3g}</title></rect>"
            )
        body.append(f'<text x="{_num(width - 4)}" y="{_num(y + 14)}" text-anchor="end">{worst:.3g}</text></g>')
    return _svg(width, height, "relative change by module", body)


def change_legend() -> str:
    """The heat map's scale: unchanged, then one swatch per decade from 1e-6 to 1."""
    swatches = [("0", 0.0)] + [(f"1e-{d}" if d else "1", 10.0**-d) for d in range(CHANGE_DECADES, -1, -1)]
    body = []
    for index, (label, value) in enumerate(swatches):
        x = index * 64.0
        body.append(f'<rect x="{_num(x)}" y="0" width="60" height="14" fill="{change_colour(value)}" class="cell"/>')
        body.append(f'<text x="{_num(x + 30)}" y="28" text-anchor="middle">{label}</text>')
    return _svg(len(swatches) * 64.0, 32.0, "colour scale of relative change", body)


def share_bar(fraction: float, *, width: float = 160.0) -> str:
    """A small horizontal bar filled to ``fraction`` (0..1)."""
    filled = max(min(fraction, 1.0), 0.0) * width
    body = [
        f'<rect x="0" y="2" width="{_num(width)}" height="10" fill="{UNCHANGED_COLOUR}"/>',
        f'<rect x="0" y="2" width="{_num(filled)}" height="10" fill="{LINE_COLOUR}"/>',
    ]
    return _svg(width, 14.0, f"{fraction:.0%}", body)
