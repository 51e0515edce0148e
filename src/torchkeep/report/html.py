"""The run report as one self-contained HTML page: inline CSS and SVG, no script, no URL.

Every string that comes from the run (paths, metric and module names, error text) goes through
:func:`html.escape`. A Content-Security-Policy of ``default-src 'none'`` makes the browser refuse any
fetch, so the page cannot reach the network even if something in it named a URL.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from html import escape

from torchkeep.report import svg
from torchkeep.report.collect import CheckpointRow, RunSummary, Weights, is_finite_number
from torchkeep.weights.diff import DiffReport
from torchkeep.weights.inspect import human_bytes

CSP = "default-src 'none'; style-src 'unsafe-inline'"

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 24px auto;
       max-width: 1040px; padding: 0 16px; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }
.meta, .note { color: #555; } .note { font-size: 13px; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; white-space: nowrap; }
td.why { white-space: normal; }
td.num { text-align: right; } th { background: #f6f6f6; }
.mark { display: inline-block; padding: 0 6px; border-radius: 8px; font-size: 12px; margin-right: 4px; color: #fff; }
.mark.latest { background: #1f6fb4; } .mark.best { background: #d62728; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; } figcaption { font-weight: 600; }
svg text { font: 11px system-ui, sans-serif; fill: #333; } svg text.head { font-weight: 600; }
svg .plot { fill: #fafafa; stroke: #ccc; } svg .grid { stroke: #e4e4e4; }
svg .outer { stroke: #fff; stroke-width: 2; } svg .leaf { stroke: #fff; stroke-width: 1; }
svg .cell { stroke: #fff; }
code { background: #f3f3f3; padding: 0 3px; }
"""


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds > 0 else "unknown"


def _metric(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _marks(row: CheckpointRow) -> str:
    marks = [f'<span class="mark {m}">{m}</span>' for m, on in (("latest", row.is_latest), ("best", row.is_best)) if on]
    return "".join(marks)


def _kept(row: CheckpointRow, policies_known: bool) -> str:
    if not policies_known:
        return "?"
    return _e(", ".join(row.kept_by)) if row.kept_by else "nothing: the next save deletes it"


def _retention_note(summary: RunSummary) -> str:
    if summary.policies:
        policies = ", ".join(f"<code>{_e(p)}</code>" for p in summary.policies)
        return (
            f'<p class="note">Retention, as given to the report: {policies}. A manager keeps what any policy keeps, '
            "plus the latest and the best checkpoints, always.</p>"
        )
    return (
        '<p class="note" id="policies-unknown">This run\'s retention policies are not recorded on disk (they are '
        "arguments of the CheckpointManager in the training script), so <em>kept by</em> is unknown. Pass them to "
        "see it, e.g. <code>torchkeep report RUN_DIR --keep-last 2 --keep-best 1 --monitor loss</code>.</p>"
    )


def checkpoints_section(summary: RunSummary) -> str:
    names = list(dict.fromkeys(name for row in summary.rows for name in row.metrics))
    head = ["step", "time", "size", *names, "", "kept by"]
    lines = ["<table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    known = bool(summary.policies)
    for row in summary.rows:
        metrics = "".join(
            f'<td class="num">{_e(_metric(row.metrics[n])) if n in row.metrics else "–"}</td>' for n in names
        )
        lines.append(
            f'<tr data-step="{row.step}"><td class="num">{row.step}</td><td>{_e(_when(row.time))}</td>'
            f'<td class="num">{_e(human_bytes(row.size))}</td>{metrics}<td>{_marks(row)}</td>'
            f'<td class="why">{_kept(row, known)}</td></tr>'
        )
    lines.append("</tbody></table>")
    if summary.monitor is None:
        lines.append('<p class="note">No <code>--monitor</code> given: the best checkpoint is not marked.</p>')
    else:
        lines.append(f'<p class="note">Best by <code>{_e(summary.monitor)}</code> ({_e(summary.mode)}).</p>')
    if summary.damaged:
        items = "".join(f"<li><code>{_e(name)}</code>: {_e(why)}</li>" for name, why in sorted(summary.damaged.items()))
        lines.append(f"<p>Folders named like checkpoints that could not be read:</p><ul>{items}</ul>")
    return f'<section id="checkpoints"><h2>Checkpoints</h2>{_retention_note(summary)}{"".join(lines)}</section>'


def metrics_section(summary: RunSummary) -> str:
    if not summary.metric_names:
        return '<section id="metrics"><h2>Metrics</h2><p>No checkpoint of this run recorded a metric.</p></section>'
    best = next((row.step for row in summary.rows if row.is_best), None)
    figures = []
    for name in summary.metric_names:
        points = [(row.step, float(v)) for row in summary.rows if is_finite_number(v := row.metrics.get(name))]
        chart = svg.line_chart(name, points, best_step=best if name == summary.monitor else None)
        figures.append(f'<figure data-metric="{_e(name)}"><figcaption>{_e(name)}</figcaption>{chart}</figure>')
    return f'<section id="metrics"><h2>Metrics</h2><div class="charts">{"".join(figures)}</div></section>'


def weights_sections(weights: Weights) -> str:
    title = f"Parameters by module (step {weights.step}, the latest)"
    if weights.missing is not None:
        why = f"<p>No model weights in step {weights.step}: {_e(weights.missing)}</p>"
        return f'<section id="treemap"><h2>{_e(title)}</h2>{why}</section>'
    total = sum(d.nbytes for d in weights.dtypes)
    params = sum(d.params for d in weights.dtypes)
    summary = (
        f'<p class="note">{params:,} parameters, {_e(human_bytes(total))} in {len(weights.modules)} modules; '
        "area is bytes, hover for each module.</p>"
    )
    rows = "".join(
        f'<tr data-dtype="{_e(d.dtype)}"><td>{_e(d.dtype)}</td><td class="num">{d.tensors}</td>'
        f'<td class="num">{d.params:,}</td><td class="num">{_e(human_bytes(d.nbytes))}</td>'
        f'<td class="num">{d.nbytes / total if total else 0:.1%}</td>'
        f"<td>{svg.share_bar(d.nbytes / total if total else 0.0)}</td></tr>"
        for d in weights.dtypes
    )
    table = (
        "<table><thead><tr><th>dtype</th><th>tensors</th><th>parameters</th><th>bytes</th><th>share</th><th></th>"
        f"</tr></thead><tbody>{rows}</tbody></table>"
    )
    return (
        f'<section id="treemap"><h2>{_e(title)}</h2>{summary}{svg.treemap(weights.modules)}</section>'
        f'<section id="dtypes"><h2>Dtype mix</h2>{table}</section>'
    )


def _names(title: str, names: Sequence[str]) -> str:
    if not names:
        return ""
    shown = ", ".join(f"<code>{_e(n)}</code>" for n in names[:50])
    more = f" and {len(names) - 50} more" if len(names) > 50 else ""
    return f"<p>{_e(title)} ({len(names)}): {shown}{more}</p>"


def diff_section(report: DiffReport | None, steps: tuple[int, int] | None, no_diff: str | None) -> str:
    if report is None or steps is None:
        title = "Change between the last two checkpoints"
        return f'<section id="diff"><h2>{title}</h2><p id="no-diff">No diff: {_e(no_diff)}.</p></section>'
    changed = len(report.changed())
    verdict = "identical weights" if report.identical else f"{changed} of {len(report.tensors)} tensors changed"
    parts = [
        f'<p class="note">Step {steps[0]} → step {steps[1]}: {_e(verdict)}. Colour: relative change '
        "‖b − a‖ / ‖a‖ of each tensor (log scale); hover a cell for its name and value.</p>",
        f"<div>{svg.change_legend()}</div>",
        f"<div>{svg.heatmap(report)}</div>"
        if report.tensors
        else "<p>No tensor is on both sides with the same shape.</p>",
        _names(f"only in step {steps[0]}", report.only_in_a),
        _names(f"only in step {steps[1]}", report.only_in_b),
        _names("shape or dtype changed", [f"{n}: {a} → {b}" for n, a, b in report.mismatched]),
    ]
    modules = len(report.grouped())
    if modules > svg.MAX_HEAT_ROWS:
        parts.append(f'<p class="note">The first {svg.MAX_HEAT_ROWS} of {modules} modules shown.</p>')
    title = f"Change from step {steps[0]} to step {steps[1]}"
    return f'<section id="diff"><h2>{_e(title)}</h2>{"".join(parts)}</section>'


def page(summary: RunSummary, *, version: str) -> str:
    """The whole document."""
    count = len(summary.rows)
    body = [
        f"<h1>Run report: {_e(summary.run_dir)}</h1>",
        f'<p class="meta">{count} checkpoint{"s" if count != 1 else ""}, steps {summary.rows[0].step} to '
        f"{summary.rows[-1].step} · written by torchkeep {_e(version)}</p>",
        checkpoints_section(summary),
        metrics_section(summary),
        weights_sections(summary.weights),
        diff_section(summary.diff, summary.diff_steps, summary.no_diff),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>torchkeep report: {_e(summary.run_dir)}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )
