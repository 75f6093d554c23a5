"""The Markdown summary and the self-contained HTML picture, including a render in a real headless browser."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pytest_gpumem.breakdown import Component
from pytest_gpumem.predict.analytic import estimate
from pytest_gpumem.record import measured_peak
from pytest_gpumem.report.html import (
    BASELINE_COLOUR,
    BUDGET_COLOUR,
    COMPONENT_COLOURS,
    EXTRA_COLOURS,
    component_colour,
    render_html,
    write_html,
)
from pytest_gpumem.report.markdown import render_markdown, write_markdown
from pytest_gpumem.units import GIB, MIB, format_both

MODELS = ["Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-1.5B", "Qwen/Qwen3-4B", "meta-llama/Llama-3.2-1B", "Qwen/Qwen2.5-7B"]


def make_result(index: int, *, mode: str = "estimate", budget_factor: float = 1.3, baseline_factor: float | None = 1.0,
                **setup_changes) -> dict:
    """A per-test result record shaped as the plugin produces it, around a real estimate."""
    model = MODELS[index % len(MODELS)]
    setup = {"model": model, "max_completion_length": 256 * (1 + index % 4), **setup_changes}
    est = estimate(setup, gpu="H100")
    budget = int(est.peak_bytes * budget_factor)
    result = {"nodeid": f"tests/test_grpo.py::test_budget[{model}-{index}]", "mode": mode, "budget_bytes": budget,
              "budget_text": format_both(budget), "setup": est.setup.to_dict(), "predicted": est.breakdown.to_dict(),
              "measured": None, "baseline": None,
              "gpu": {"name": "NVIDIA H100 80GB HBM3", "total_bytes": 85_520_809_984},
              "verdict": "passed" if budget >= est.peak_bytes else "failed",
              "reason": None if budget >= est.peak_bytes else f"predicted peak {est.peak_bytes} over budget"}
    if mode == "measure":
        measured_breakdown = dict(est.breakdown.to_dict(), source="measure")
        result["measured"] = {"breakdown": measured_breakdown, "peak_reserved_bytes": int(est.peak_bytes * 0.93),
                              "peak_allocated_bytes": int(est.peak_bytes * 0.9),
                              "nvml_peak_bytes": est.peak_bytes + 500 * MIB,
                              "reasons": {}}
    if baseline_factor is None:
        result["baseline"] = {"peak_bytes": None, "delta_bytes": None, "status": "missing",
                              "message": "no baseline for [estimate] in .gpumem/baselines.json"}
    else:
        base = int(est.peak_bytes * baseline_factor)
        delta = est.peak_bytes - base
        status = "grew" if delta > 0.05 * base else "shrank" if -delta > 0.05 * base else "same"
        result["baseline"] = {"peak_bytes": base, "delta_bytes": delta, "status": status,
                              "message": (f"GPU memory regression: peak grew by {delta} bytes" if status == "grew"
                                          else "ok")}
        if status == "grew":
            result["verdict"], result["reason"] = "failed", result["baseline"]["message"]
    return result


def many_results(count: int = 60) -> list[dict]:
    results = []
    for i in range(count):
        kwargs = {"backend": "unsloth", "use_vllm": True} if i % 3 == 0 else {}
        results.append(make_result(i, mode="measure" if i % 2 else "estimate", budget_factor=0.9 if i % 7 == 0 else 1.3,
                                   baseline_factor=None if i % 5 == 0 else 0.8 if i % 11 == 0 else 1.0, **kwargs))
    return results


# -- Markdown ------------------------------------------------------------------------------------------
def test_markdown_table_has_one_row_per_test_with_the_numbers():
    results = [make_result(0, baseline_factor=None), make_result(1, mode="measure", baseline_factor=0.8),
               make_result(2, budget_factor=0.5)]
    text = render_markdown(results)
    assert text.startswith("## GPU memory (pytest-gpumem)\n")
    assert "**2 failed, 1 passed** · mode: estimate, measure · GPU: NVIDIA H100 80GB HBM3" in text
    rows = [line for line in text.splitlines() if line.startswith("| `tests/")]
    assert len(rows) == 3
    cells = [cell.strip() for cell in rows[1].strip("|").split(" | ")]
    measured_bytes = results[1]["measured"]["nvml_peak_bytes"]
    predicted_bytes = results[1]["predicted"]["peak_bytes"]
    assert cells[1] == "measure"
    assert cells[2] == results[1]["budget_text"].split(" = ")[0]  # the budget as the user wrote it
    assert cells[3] == f"{predicted_bytes / GIB:.2f} GiB"
    assert cells[4] == f"{measured_bytes / GIB:.2f} GiB (NVML)"
    assert cells[5] == f"{results[1]['baseline']['peak_bytes'] / GIB:.2f} GiB"
    assert cells[6].startswith("+") and "grew" in cells[6]
    assert cells[7] == "❌ failed"
    assert "no baseline" in rows[0] and "✅ passed" in rows[0]
    # the reasons, one collapsible block per failing test
    assert text.count("<details>") == 2 and "GPU memory regression" in text and "over budget" in text


def test_markdown_escapes_pipes_and_keeps_one_line_per_row():
    result = make_result(0)
    result["nodeid"] = "tests/test_x.py::test_p[a|b\nc]"
    text = render_markdown([result])
    row = next(line for line in text.splitlines() if line.startswith("| `tests/"))
    assert "a\\|b c" in row
    assert len(re.findall(r"(?<!\\)\|", row)) == 9  # 8 columns


def test_markdown_with_no_tests():
    assert "No test had a GPU memory budget." in render_markdown([])


def test_write_markdown_appends_to_github_step_summary(tmp_path):
    summary = tmp_path / "step_summary.md"
    summary.write_text("# Earlier step\n")
    written = write_markdown([make_result(0)], tmp_path / "out" / "gpumem.md",
                             environ={"GITHUB_STEP_SUMMARY": str(summary)})
    assert written == [tmp_path / "out" / "gpumem.md", summary]
    own = (tmp_path / "out" / "gpumem.md").read_text()
    assert summary.read_text() == "# Earlier step\n\n" + own  # appended, earlier content kept
    write_markdown([make_result(0)], tmp_path / "again.md", environ={"GITHUB_STEP_SUMMARY": str(summary)})
    assert summary.read_text().count("## GPU memory (pytest-gpumem)") == 2


def test_write_markdown_without_github_writes_only_the_file(tmp_path):
    assert write_markdown([make_result(0)], tmp_path / "gpumem.md", environ={}) == [tmp_path / "gpumem.md"]


# -- HTML: structure and geometry -------------------------------------------------------------------------
class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.elements: list[tuple[str, dict, list[str]]] = []  # tag, attributes, enclosing svg classes
        self._svg: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "svg":
            self._svg.append(attrs.get("class", ""))
        self.elements.append((tag, attrs, list(self._svg)))

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs), list(self._svg)))

    def handle_endtag(self, tag):
        if tag == "svg" and self._svg:
            self._svg.pop()


def _parse(text: str) -> _Collector:
    collector = _Collector()
    collector.feed(text)
    return collector


def test_html_is_self_contained():
    text = render_html(many_results(8))
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    lowered = text.lower()
    for forbidden in ("http:", "https:", "<script", "<link", "<img", "@import", "url("):
        assert forbidden not in lowered, forbidden


def test_html_draws_each_test_with_budget_measured_and_baseline_markers():
    results = many_results(12)
    collector = _parse(render_html(results))
    svgs = [attrs for tag, attrs, _ in collector.elements if tag == "svg"]
    assert [a["class"] for a in svgs].count("overview") == 12 and [a["class"] for a in svgs].count("detail") == 12
    detail_lines = [(attrs, svg) for tag, attrs, svg in collector.elements
                    if tag == "line" and svg and svg[-1] == "detail"]
    assert sum(1 for a, _ in detail_lines if a.get("class") == "budget") == 12
    assert (sum(1 for a, _ in detail_lines if a.get("class") == "measured")
            == sum(r["mode"] == "measure" for r in results))
    baselines = [a for tag, a, svg in collector.elements if tag == "g" and a.get("class") == "baseline"]
    with_baseline = sum(r["baseline"]["peak_bytes"] is not None for r in results)
    assert len(baselines) == 2 * with_baseline  # overview + detail
    # every component of every drawn phase is a coloured rectangle with a tooltip
    segments = [a for tag, a, _ in collector.elements if tag == "rect" and a.get("class") == "segment"]
    assert len(segments) > 12 * 10
    assert {a["fill"] for a in segments} >= {COMPONENT_COLOURS["weights"], COMPONENT_COLOURS["optimizer_states"]}


def test_html_geometry_matches_the_numbers():
    """In the overview row, the stacked bar ends at peak/scale and the budget line sits at budget/scale."""
    result = make_result(1, budget_factor=2.0, baseline_factor=None)  # budget = 2 x peak, nothing else further out
    collector = _parse(render_html([result]))
    overview = [(tag, a) for tag, a, svg in collector.elements if svg and svg[-1] == "overview"]
    segments = [a for tag, a in overview if tag == "rect" and a.get("class") == "segment"]
    bar_end = max(float(a["x"]) + float(a["width"]) for a in segments)
    budget_x = next(float(a["x1"]) for tag, a in overview if tag == "line" and a.get("class") == "budget")
    assert bar_end / budget_x == pytest.approx(result["predicted"]["peak_bytes"] / result["budget_bytes"], rel=1e-3)
    # segments are contiguous from 0, largest component first
    widths = [float(a["width"]) for a in segments]
    assert float(segments[0]["x"]) == 0 and widths == sorted(widths, reverse=True)
    # the detail rows: one per phase, each as long as the phase's total
    detail = [a for tag, a, svg in collector.elements if svg and svg[-1] == "detail" and tag == "rect"
              and a.get("class") == "segment"]
    rows: dict[str, float] = {}
    for a in detail:
        rows[a["y"]] = rows.get(a["y"], 0.0) + float(a["width"])
    totals = [sum(c.values()) for c in result["predicted"]["phases"].values()]
    assert len(rows) == len(totals)
    longest = max(rows.values())
    assert sorted(w / longest for w in rows.values()) == pytest.approx(sorted(t / max(totals) for t in totals),
                                                                       rel=1e-3)


def test_html_escapes_test_ids_and_messages():
    result = make_result(0, budget_factor=0.5)
    result["nodeid"] = 'tests/test_x.py::test_p[<script>alert("x")</script>]'
    result["reason"] = "<b>bold</b> & more"
    text = render_html([result])
    assert "<script>" not in text and "&lt;script&gt;" in text and "&lt;b&gt;bold&lt;/b&gt; &amp; more" in text


def test_html_handles_results_without_breakdowns_or_budget():
    bare = {"nodeid": "t::bare", "mode": "measure", "budget_bytes": None, "budget_text": None, "setup": None,
            "predicted": None, "measured": {"breakdown": None, "peak_reserved_bytes": None,
                                           "peak_allocated_bytes": None,
                                           "nvml_peak_bytes": 3 * GIB, "reasons": {"peak_reserved_bytes": "no CUDA"}},
            "baseline": None, "gpu": None, "verdict": "skipped", "reason": "no CUDA device"}
    text = render_html([bare])
    assert "t::bare" in text and "no CUDA" in text
    assert measured_peak(bare) == ("NVML", 3 * GIB)
    assert "No test had a GPU memory budget." in render_html([])


def test_component_colours_are_distinct_and_stable():
    canonical = [COMPONENT_COLOURS[c.value] for c in Component]
    assert len(set(canonical)) == len(canonical)
    assert BUDGET_COLOUR not in canonical and BASELINE_COLOUR not in canonical
    assert component_colour("measured_other_bucket") == component_colour("measured_other_bucket") in EXTRA_COLOURS


def test_write_html_creates_the_file(tmp_path):
    path = write_html(many_results(3), tmp_path / "reports" / "gpumem.html")
    assert path.read_text().count('<section class="test"') == 3


# -- HTML in a real browser ----------------------------------------------------------------------------
def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _chromium(browser: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    # flags: no sandbox (root in CI containers), no GPU, and nothing that would reach the network
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
               "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def _screenshot_colours(browser: str, tmp_path: Path, html_path: Path,
                        name: str) -> tuple[tuple[int, int], dict, float]:
    from PIL import Image

    png = tmp_path / f"{name}.png"
    done = _chromium(browser, tmp_path, f"--screenshot={png}", "--window-size=1280,1600", html_path.as_uri())
    assert png.exists() and png.stat().st_size > 0, done.stderr[-2000:]
    with Image.open(png) as image:
        rgb = image.convert("RGB")
        colours = {colour: count for count, colour in rgb.getcolors(maxcolors=1 << 20)}
        size = rgb.size
    white = colours.get((255, 255, 255), 0)
    return size, colours, 1 - white / (size[0] * size[1])


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


@pytest.mark.skipif(_browser() is None,
                    reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")
def test_html_renders_in_a_headless_browser(tmp_path):
    """60 tests: the browser parses the inline SVG, and the screenshot shows the components, budget and markers."""
    pytest.importorskip("PIL", reason="Pillow decodes the screenshot (in the 'test' extra)")
    browser = _browser()
    results = many_results(60)
    report = write_html(results, tmp_path / "gpumem.html")

    dom = _chromium(browser, tmp_path, "--dump-dom", report.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<svg") == 120 and dom.stdout.count('class="budget"') == 120

    size, colours, inked = _screenshot_colours(browser, tmp_path, report, "report")
    assert size == (1280, 1600)
    assert len(colours) > 100, f"only {len(colours)} colours: the picture is nearly blank"
    assert inked > 0.15, f"only {inked:.1%} of the page is not white"
    # well beyond the legend's swatches (12 x 12 px) and lines (3 x 14 px): the bars and markers themselves
    for name in ("weights", "optimizer_states", "gradients", "vllm_kv_cache"):
        pixels = colours.get(_rgb(COMPONENT_COLOURS[name]), 0)
        assert pixels > 2000, f"{name} ({COMPONENT_COLOURS[name]}): {pixels} pixels in the screenshot"
    for name, colour in (("budget line", BUDGET_COLOUR), ("baseline marker", BASELINE_COLOUR)):
        assert colours.get(_rgb(colour), 0) > 300, f"{name} ({colour}) missing from the screenshot"

    # the control: the same page with no tests draws none of it, so the checks above can fail
    empty = write_html([], tmp_path / "empty.html")
    _, empty_colours, empty_inked = _screenshot_colours(browser, tmp_path, empty, "empty")
    assert empty_inked < 0.05
    weights = _rgb(COMPONENT_COLOURS["weights"])
    assert colours.get(weights, 0) > 50 * empty_colours.get(weights, 0) + 30
