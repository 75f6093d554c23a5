"""One self-contained HTML picture of where the memory goes: no scripts, no network, no dependency, inline SVG.

An overview row per test (the peak phase's components stacked, against the budget line, the measured peak and
the baseline marker, each row on its own scale so 50+ tests stay readable), then per test a stacked bar per
phase. Every :class:`~pytest_gpumem.breakdown.Component` has its colour in :data:`COMPONENT_COLOURS`.
"""

from __future__ import annotations

import html
import os
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..breakdown import PHASE_ORDER, Breakdown, Component
from ..record import measured_peak
from ..units import GIB, format_gib
from .cells import (
    RoleRow,
    baseline_of,
    breakdown_of,
    budget_cell,
    context,
    counts,
    delta_text,
    gib_or_dash,
    origin_label,
    origin_rows,
    predicted_peak,
    record_role_rows,
    signed_or_dash,
)

#: plain-text arrows for the HTML: a CI browser or an offline laptop may lack an emoji font
HTML_BASELINE_SYMBOLS = {"grew": "▲", "shrank": "▼", "same": "", "missing": ""}

#: One colour per canonical component, stable across reports (tab20-like, no pure red: red is the budget).
COMPONENT_COLOURS = {
    Component.CUDA_CONTEXT.value: "#7f7f7f",
    Component.WEIGHTS.value: "#1f77b4",
    Component.LORA.value: "#17becf",
    Component.GRADIENTS.value: "#ff7f0e",
    Component.OPTIMIZER_STATES.value: "#9467bd",
    Component.OPTIMIZER_TEMP.value: "#c5b0d5",
    Component.REFERENCE.value: "#aec7e8",
    Component.VLLM_WEIGHTS.value: "#2ca02c",
    Component.VLLM_KV_CACHE.value: "#98df8a",
    Component.VLLM_ACTIVATIONS.value: "#bcbd22",
    Component.VLLM_CUDA_GRAPHS.value: "#dbdb8d",
    Component.VLLM_NON_TORCH.value: "#637939",
    Component.GENERATE_KV_CACHE.value: "#8c564b",
    Component.GENERATE_LOGITS.value: "#c49c94",
    Component.ACTIVATIONS.value: "#ffbb78",
    Component.RECOMPUTED_LAYER.value: "#e7ba52",
    Component.LOGITS.value: "#e377c2",
    Component.ATTENTION_MASK.value: "#f7b6d2",
    Component.WEIGHT_CASTS.value: "#9edae5",
    Component.BATCH_BUFFERS.value: "#393b79",
    Component.MASTER_WEIGHTS.value: "#5254a3",
    Component.GATHERED_PARAMS.value: "#6b6ecf",
    Component.REDUCE_BUCKETS.value: "#bd9e39",
    Component.WEIGHT_SYNC.value: "#8ca252",
    Component.NCCL_BUFFERS.value: "#b5cf6b",
    Component.VLLM_WEIGHT_SYNC.value: "#843c39",
    Component.ALLOCATOR_SLACK.value: "#d9d9d9",
    Component.OTHER.value: "#525252",
}
#: For component names a producer made up (a measurement's own buckets): picked by a stable hash.
EXTRA_COLOURS = ("#843c39", "#ad494a", "#d6616b", "#e7969c", "#7b4173", "#a55194", "#ce6dbd", "#de9ed6",
                 "#3182bd", "#6baed6", "#31a354", "#74c476", "#756bb1", "#9e9ac8", "#e6550d", "#fd8d3c")
BUDGET_COLOUR = "#d00000"
MEASURED_COLOUR = "#000000"
BASELINE_COLOUR = "#0050d0"
VERDICT_COLOURS = {"passed": "#1a7f37", "failed": "#cf222e", "error": "#cf222e", "xfailed": "#6e7781",
                   "skipped": "#6e7781"}


def component_colour(name: str) -> str:
    return COMPONENT_COLOURS.get(name) or EXTRA_COLOURS[zlib.crc32(name.encode()) % len(EXTRA_COLOURS)]


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1f2328;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px}
.sub{color:#59636e;margin-bottom:12px}
table{border-collapse:collapse;width:100%}
th,td{padding:2px 8px;border-bottom:1px solid #e6e8eb;text-align:left;vertical-align:middle;white-space:nowrap}
th{background:#f6f8fa;font-weight:600;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.test{white-space:normal;overflow-wrap:anywhere;min-width:240px;max-width:560px;font-family:ui-monospace,monospace;font-size:12px}
.verdict{font-weight:600}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;margin:8px 0 12px}
.legend span{display:inline-flex;align-items:center;gap:4px;font-size:12px}
.legend i{display:inline-block;width:12px;height:12px;border:1px solid #0002}
.legend i.line{width:3px;height:14px;border:0}
section.test{border-top:1px solid #d1d9e0;padding:8px 0}
section.test h3{font-size:13px;font-family:ui-monospace,monospace;margin:4px 0;word-break:break-all}
.facts{font-size:12px;color:#59636e}
pre{background:#f6f8fa;padding:8px;white-space:pre-wrap;font-size:12px;margin:6px 0}
a{color:inherit}
small{color:#59636e}
"""
#: added only when a report has a multi-GPU or simulate-mode test: a one-GPU estimate report stays as it was
_ROLES_CSS = """h4{font-size:12px;margin:8px 0 4px}
table.roles,table.origins{width:auto;margin:4px 0;font-size:12px}
i.swatch{display:inline-block;width:10px;height:10px;margin-right:4px;border:1px solid #0002}
"""

_OVERVIEW_WIDTH, _OVERVIEW_HEIGHT = 300, 16
_DETAIL_LABEL_WIDTH, _DETAIL_PLOT_WIDTH, _DETAIL_ROW_HEIGHT = 130, 760, 16


def _attr(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _scale_max(result: Mapping[str, Any], *breakdowns: Breakdown | None) -> int:
    values = [result.get("budget_bytes"), measured_peak(result)[1], baseline_of(result).get("peak_bytes")]
    values += [b.peak_bytes for b in breakdowns if b is not None and b.phases]
    biggest = max((int(v) for v in values if v), default=0)
    return max(int(biggest * 1.06), 1)


def _stacked_rects(components: Mapping[str, int], x0: float, y: float, height: float, px_per_byte: float,
                   phase: str, css_class: str, origins: Mapping[str, str] | None = None) -> list[str]:
    """Largest component first (leftmost), so the same big parts line up across phases and tests; ``origins``
    (simulate mode's whole step) adds "[estimate]" to the title of a part the estimate supplied."""
    origins = origins or {}
    rects, x = [], x0
    for name, num_bytes in sorted(components.items(), key=lambda kv: (-kv[1], kv[0])):
        width = num_bytes * px_per_byte
        if width <= 0:
            continue
        rects.append(f'<rect class="{css_class}" x="{x:.2f}" y="{y:.2f}" width="{width:.2f}" height="{height:.2f}" '
                     f'fill="{component_colour(name)}"><title>{_attr(phase)} / {_attr(name)}: '
                     f'{_attr(format_gib(num_bytes))}{_attr(origins.get(name, ""))}</title></rect>')
        x += width
    return rects


def _markers(result: Mapping[str, Any], x0: float, px_per_byte: float, y0: float, y1: float) -> list[str]:
    """Budget (red dashed), measured peak (black), baseline (blue dotted, with a diamond)."""
    marks = []
    budget = result.get("budget_bytes")
    if budget:
        x = x0 + budget * px_per_byte
        marks.append(f'<line class="budget" x1="{x:.2f}" x2="{x:.2f}" y1="{y0 - 2:.2f}" y2="{y1 + 2:.2f}" '
                     f'stroke="{BUDGET_COLOUR}" stroke-width="3" stroke-dasharray="5,3"><title>budget '
                     f'{_attr(result.get("budget_text") or format_gib(budget))}</title></line>')
    what, measured = measured_peak(result)
    if measured is not None:
        x = x0 + measured * px_per_byte
        marks.append(f'<line class="measured" x1="{x:.2f}" x2="{x:.2f}" y1="{y0 - 2:.2f}" y2="{y1 + 2:.2f}" '
                     f'stroke="{MEASURED_COLOUR}" stroke-width="2.5"><title>measured peak ({_attr(what)}) '
                     f'{_attr(format_gib(measured))}</title></line>')
    base = baseline_of(result).get("peak_bytes")
    if base is not None:
        x = x0 + base * px_per_byte
        mid = (y0 + y1) / 2
        marks.append(f'<g class="baseline"><title>baseline {_attr(format_gib(base))} '
                     f'({_attr(baseline_of(result).get("status", ""))})</title>'
                     f'<line x1="{x:.2f}" x2="{x:.2f}" y1="{y0 - 2:.2f}" y2="{y1 + 2:.2f}" stroke="{BASELINE_COLOUR}" '
                     f'stroke-width="2" stroke-dasharray="2,2"/><path d="M{x:.2f},{mid - 5:.2f} l5,5 l-5,5 l-5,-5 z" '
                     f'fill="{BASELINE_COLOUR}"/></g>')
    return marks


def _drawn_breakdowns(result: Mapping[str, Any]) -> list[tuple[str, Breakdown]]:
    drawn = []
    predicted = breakdown_of(result.get("predicted"))
    if predicted is not None and predicted.phases:
        drawn.append(("predicted", predicted))
    measured = breakdown_of((result.get("measured") or {}).get("breakdown"))
    if measured is not None and measured.phases:
        drawn.append((measured.source if measured.source != "estimate" else "measured", measured))
    return drawn


def overview_svg(result: Mapping[str, Any]) -> str:
    """One row: the peak phase of the main breakdown (measured if any, else predicted), stacked, plus markers."""
    drawn = _drawn_breakdowns(result)
    main = drawn[-1][1] if drawn else None
    scale = _scale_max(result, *(b for _, b in drawn))
    px = (_OVERVIEW_WIDTH - 8) / scale
    parts = [f'<svg class="overview" width="{_OVERVIEW_WIDTH}" height="{_OVERVIEW_HEIGHT + 6}" role="img" '
             f'aria-label="{_attr(result.get("nodeid", ""))}">',
             f'<rect x="0" y="3" width="{_OVERVIEW_WIDTH - 8}" height="{_OVERVIEW_HEIGHT}" fill="#f6f8fa"/>']
    if main is not None:
        phase = main.peak_phase
        parts += _stacked_rects(main.components(phase), 0, 3, _OVERVIEW_HEIGHT, px, phase, "segment")
    parts += _markers(result, 0, px, 3, 3 + _OVERVIEW_HEIGHT)
    parts.append("</svg>")
    return "".join(parts)


def detail_svg(result: Mapping[str, Any]) -> str:
    """A stacked bar per phase (and per source when both a prediction and a measurement exist)."""
    drawn = _drawn_breakdowns(result)
    phases = [p for p in PHASE_ORDER if any(p in b.phases for _, b in drawn)]
    phases += sorted({p for _, b in drawn for p in b.phases} - set(phases))
    rows = [(phase, label, b) for phase in phases for label, b in drawn if phase in b.phases]
    scale = _scale_max(result, *(b for _, b in drawn))
    px = _DETAIL_PLOT_WIDTH / scale
    gap, top = 4, 6
    plot_bottom = top + len(rows) * (_DETAIL_ROW_HEIGHT + gap)
    height = plot_bottom + 22
    width = _DETAIL_LABEL_WIDTH + _DETAIL_PLOT_WIDTH + 20
    parts = [f'<svg class="detail" width="{width}" height="{height}" role="img" '
             f'aria-label="breakdown of {_attr(result.get("nodeid", ""))}">']
    # GiB grid: a round step giving 4-10 ticks
    step = _tick_step(scale)
    tick = 0
    while tick <= scale:
        x = _DETAIL_LABEL_WIDTH + tick * px
        parts.append(f'<line x1="{x:.2f}" x2="{x:.2f}" y1="{top - 2}" y2="{plot_bottom}" stroke="#e6e8eb"/>'
                     f'<text x="{x:.2f}" y="{plot_bottom + 14}" font-size="10" text-anchor="middle" fill="#59636e">'
                     f'{_attr(_tick_label(tick))}</text>')
        tick += step
    for index, (phase, label, breakdown) in enumerate(rows):
        y = top + index * (_DETAIL_ROW_HEIGHT + gap)
        weight = "600" if phase == breakdown.peak_phase else "400"
        text = phase if len(drawn) == 1 else f"{phase} · {label[:4]}"
        parts.append(f'<text x="{_DETAIL_LABEL_WIDTH - 6}" y="{y + _DETAIL_ROW_HEIGHT - 4}" font-size="11" '
                     f'text-anchor="end" font-weight="{weight}" fill="#1f2328">{_attr(text)}</text>')
        origins = {name: f" [{origin}]" for name, origin in breakdown.origins.get(phase, {}).items()}
        parts += _stacked_rects(breakdown.components(phase), _DETAIL_LABEL_WIDTH, y, _DETAIL_ROW_HEIGHT, px,
                                f"{phase} ({label})", "segment", origins)
        total = breakdown.total(phase)
        parts.append(f'<text x="{_DETAIL_LABEL_WIDTH + total * px + 4:.2f}" y="{y + _DETAIL_ROW_HEIGHT - 4}" '
                     f'font-size="10" fill="#59636e">{_attr(format_gib(total))}</text>')
    if rows or result.get("budget_bytes"):
        parts += _markers(result, _DETAIL_LABEL_WIDTH, px, top, max(plot_bottom - gap, top + _DETAIL_ROW_HEIGHT))
    parts.append("</svg>")
    return "".join(parts)


def roles_svg(rows: Sequence[RoleRow], breakdown: Breakdown) -> str:
    """A bar per role (its peak phase, stacked) against that role's own budget line, on one scale."""
    biggest = max((v or 0 for row in rows for v in (row.peak_bytes, row.budget_bytes, row.measured_bytes)), default=0)
    scale = max(int(biggest * 1.06), 1)
    px = _DETAIL_PLOT_WIDTH / scale
    gap, top = 4, 6
    height = top + len(rows) * (_DETAIL_ROW_HEIGHT + gap) + 4
    parts = [f'<svg class="roles" width="{_DETAIL_LABEL_WIDTH + _DETAIL_PLOT_WIDTH + 20}" height="{height}" '
             'role="img" aria-label="peak per role">']
    for index, row in enumerate(rows):
        y = top + index * (_DETAIL_ROW_HEIGHT + gap)
        parts.append(f'<text x="{_DETAIL_LABEL_WIDTH - 6}" y="{y + _DETAIL_ROW_HEIGHT - 4}" font-size="11" '
                     f'text-anchor="end" font-weight="{"600" if row.worst else "400"}" fill="#1f2328">'
                     f'{_attr(row.role)}</text>')
        parts += _stacked_rects(breakdown.role(row.role).components(row.peak_phase), _DETAIL_LABEL_WIDTH, y,
                                _DETAIL_ROW_HEIGHT, px, f"{row.role} {row.peak_phase}", "segment")
        parts.append(f'<text x="{_DETAIL_LABEL_WIDTH + row.peak_bytes * px + 4:.2f}" y="{y + _DETAIL_ROW_HEIGHT - 4}" '
                     f'font-size="10" fill="#59636e">{_attr(format_gib(row.peak_bytes))}</text>')
        if row.budget_bytes:
            x = _DETAIL_LABEL_WIDTH + row.budget_bytes * px
            parts.append(f'<line class="role-budget" x1="{x:.2f}" x2="{x:.2f}" y1="{y - 2}" '
                         f'y2="{y + _DETAIL_ROW_HEIGHT + 2}" stroke="{BUDGET_COLOUR}" stroke-width="3" '
                         f'stroke-dasharray="5,3"><title>{_attr(row.role)} budget '
                         f'{_attr(row.budget_text or format_gib(row.budget_bytes))}</title></line>')
        if row.measured_bytes is not None:
            x = _DETAIL_LABEL_WIDTH + row.measured_bytes * px
            parts.append(f'<line class="measured" x1="{x:.2f}" x2="{x:.2f}" y1="{y - 2}" '
                         f'y2="{y + _DETAIL_ROW_HEIGHT + 2}" stroke="{MEASURED_COLOUR}" stroke-width="2.5"><title>'
                         f'{_attr(row.role)} measured peak {_attr(format_gib(row.measured_bytes))}</title></line>')
    parts.append("</svg>")
    return "".join(parts)


def _roles_html(result: Mapping[str, Any]) -> str:
    """A multi-GPU test's roles: the bars, then a row per role with its own budget and headroom; "" for one GPU."""
    rows = record_role_rows(result)
    if not rows:
        return ""
    out = ['<h4>Per role (per GPU, each against its own budget; the training ranks are judged on the worst)</h4>',
           roles_svg(rows, breakdown_of(result.get("predicted"))),
           '<table class="roles"><thead><tr><th>Role</th><th>GPUs</th><th>Budget</th><th>Predicted peak</th>'
           "<th>Phase</th><th>Measured</th><th>Headroom</th><th>Largest components</th><th></th></tr></thead><tbody>"]
    for row in rows:
        over = row.over
        out.append(f'<tr class="role{" over" if over else ""}"><td>{_attr(row.role)}</td>'
                   f'<td class="num">{_attr("—" if row.gpus is None else row.gpus)}</td>'
                   f'<td class="num">{_attr(row.budget_text or gib_or_dash(row.budget_bytes))}</td>'
                   f'<td class="num">{_attr(format_gib(row.peak_bytes))}</td><td>{_attr(row.peak_phase)}</td>'
                   f'<td class="num">{_attr(gib_or_dash(row.measured_bytes))}</td>'
                   f'<td class="num" style="color:{VERDICT_COLOURS["failed" if over else "passed"]}">'
                   f'{_attr(signed_or_dash(row.headroom_bytes))}</td><td>{_attr(row.top_text)}</td>'
                   f"<td>{_attr(row.note)}</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _origins_html(result: Mapping[str, Any]) -> str:
    """simulate mode's whole step: each component's origin (the simulation, or [estimate] for a part a simulation
    cannot see); "" without origins."""
    breakdown = breakdown_of(result.get("predicted"))
    rows = origin_rows(breakdown) if breakdown is not None else []
    if not rows:
        return ""
    out = [f'<h4>Where the whole step comes from (simulated torch tensors + estimated parts)</h4>'
           f'<table class="origins"><thead><tr><th>Component</th><th>At the peak ({_attr(breakdown.peak_phase)})</th>'
           "<th>Origin</th></tr></thead><tbody>"]
    for name, num_bytes, origin in rows:
        out.append(f'<tr><td><i class="swatch" style="background:{component_colour(name)}"></i>{_attr(name)}</td>'
                   f'<td class="num">{_attr(gib_or_dash(num_bytes))}</td>'
                   f"<td>{_attr(origin_label(origin, breakdown.source))}</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _tick_step(scale_bytes: int) -> int:
    for step_gib in (0.125, 0.25, 0.5, 1, 2, 4, 5, 10, 20, 40, 50, 100, 200, 500):
        step = int(step_gib * GIB)
        if scale_bytes / step <= 10:
            return step
    return max(scale_bytes // 8, 1)


def _tick_label(num_bytes: int) -> str:
    return f"{num_bytes / GIB:g} GiB"


def _legend(results: Sequence[Mapping[str, Any]]) -> str:
    names: dict[str, None] = {}
    for result in results:
        for _, breakdown in _drawn_breakdowns(result):
            for name in breakdown.component_names():
                names.setdefault(name, None)
            for role in breakdown.role_names():  # a multi-GPU test's other roles (a vLLM server's KV pool)
                for name in breakdown.role(role).component_names():
                    names.setdefault(name, None)
    canonical = [c.value for c in Component if c.value in names]
    ordered = canonical + sorted(n for n in names if n not in canonical)
    items = [f'<span><i style="background:{component_colour(n)}"></i>{_attr(n)}</span>' for n in ordered]
    items += [f'<span><i class="line" style="background:{BUDGET_COLOUR}"></i>budget</span>',
              f'<span><i class="line" style="background:{MEASURED_COLOUR}"></i>measured peak</span>',
              f'<span><i class="line" style="background:{BASELINE_COLOUR}"></i>baseline</span>']
    return f'<div class="legend">{"".join(items)}</div>'


def _setup_facts(setup: Mapping[str, Any] | None) -> str:
    if not setup:
        return ""
    keys = ("model", "backend", "dtype", "load_in_4bit", "lora_rank", "per_device_train_batch_size", "num_generations",
            "max_prompt_length", "max_completion_length", "gradient_checkpointing", "use_vllm",
            "vllm_gpu_memory_utilization")
    return " · ".join(f"{key}={setup[key]}" for key in keys if setup.get(key) is not None)


def render_html(results: Sequence[Mapping[str, Any]], *, title: str = "GPU memory (pytest-gpumem)") -> str:
    """One self-contained HTML document (inline CSS and SVG; no script, no external resource)."""
    results = list(results)
    # each test's roles and origins, rendered once: they also decide whether the report needs their CSS
    role_parts = [_roles_html(r) + _origins_html(r) for r in results]
    extra = _ROLES_CSS if any(role_parts) else ""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{_attr(title)}</title><style>{_CSS}{extra}</style></head><body>",
           f"<h1>{_attr(title)}</h1>",
           f'<div class="sub">{_attr(counts(results))}' + (f" · {_attr(context(results))}" if context(results) else "")
           + "</div>", _legend(results)]
    if not results:
        out.append("<p>No test had a GPU memory budget.</p></body></html>")
        return "\n".join(out)
    out.append('<table class="overview"><thead><tr><th>Test</th><th>Verdict</th><th>Peak phase, against budget '
               '(each row on its own scale)</th><th>Budget</th><th>Predicted</th><th>Measured</th><th>Baseline</th>'
               "<th>Δ</th></tr></thead><tbody>")
    for index, result in enumerate(results):
        verdict = result.get("verdict") or "unknown"
        what, measured = measured_peak(result)
        out.append(
            f'<tr class="{_attr(verdict)}"><td class="test">'
            f'<a href="#t{index}">{_attr(result.get("nodeid", "?"))}</a></td>'
            f'<td class="verdict" style="color:{VERDICT_COLOURS.get(verdict, "#1f2328")}">{_attr(verdict)}</td>'
            f"<td>{overview_svg(result)}</td><td class=\"num\">{_attr(budget_cell(result))}</td>"
            f'<td class="num">{_attr(gib_or_dash(predicted_peak(result)))}</td>'
            f'<td class="num">{_attr(gib_or_dash(measured))}'
            + (f" <small>{_attr(what)}</small>" if what else "") + "</td>"
            f'<td class="num">{_attr(gib_or_dash(baseline_of(result).get("peak_bytes")))}</td>'
            f'<td class="num">{_attr(delta_text(result, HTML_BASELINE_SYMBOLS))}</td></tr>')
    out.append("</tbody></table><h2>Per test: components by phase</h2>")
    for index, result in enumerate(results):
        verdict = result.get("verdict") or "unknown"
        facts = [f"mode {result.get('mode') or '—'}",
                 f"budget {result.get('budget_text') or gib_or_dash(result.get('budget_bytes'))}"]
        if result.get("gpu"):
            facts.append(f"GPU {result['gpu'].get('name')} ({gib_or_dash(result['gpu'].get('total_bytes'))})")
        reasons = (result.get("measured") or {}).get("reasons") or {}
        out.append(f'<section class="test" id="t{index}"><h3>{_attr(result.get("nodeid", "?"))} — '
                   f'<span style="color:{VERDICT_COLOURS.get(verdict, "#1f2328")}">{_attr(verdict)}</span></h3>'
                   f'<div class="facts">{_attr(" · ".join(facts))}</div>'
                   f'<div class="facts">{_attr(_setup_facts(result.get("setup")))}</div>{detail_svg(result)}'
                   f"{role_parts[index]}")
        if reasons:
            out.append('<div class="facts">not measured: ' + _attr("; ".join(f"{k}: {v}" for k, v in reasons.items()))
                       + "</div>")
        message = result.get("reason") or (baseline_of(result).get("message") if baseline_of(result).get("status") in
                                           ("grew", "shrank", "missing") else None)
        if message:
            out.append(f"<pre>{_attr(message)}</pre>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_html(results: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
               title: str = "GPU memory (pytest-gpumem)") -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_html(results, title=title), encoding="utf-8")
    return target


def write_report(records: Sequence[Mapping[str, Any]], path: Path, session: Any) -> str:
    """``--gpu-budget-html``: the picture at ``path``; the terminal line."""
    write_html(records, path)
    return f"gpu budget HTML: {path}"
