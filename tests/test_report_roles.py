"""The Markdown and HTML reports show what the terminal and the JSON already do: a row per role of a multi-GPU
job (rank 0, the other ranks, host memory, a vLLM server judged against its own budget, the worst training GPU
marked) and, in simulate mode, where each component of the whole step came from. A one-GPU estimate report is
byte for byte what it was before (tests/fixtures/report-single-gpu: records and the outputs of main at 25e86ef)."""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
from pathlib import Path

import pytest

from pytest_gpumem import estimate
from pytest_gpumem.breakdown import Breakdown
from pytest_gpumem.predict.analytic.whole_step import FROM_ESTIMATE, whole_step
from pytest_gpumem.record import predicted_dict
from pytest_gpumem.report.html import render_html
from pytest_gpumem.report.markdown import render_markdown
from pytest_gpumem.report.text import test_section as text_section
from pytest_gpumem.units import GB, GIB, format_both, format_gib

FIXTURES = Path(__file__).parent / "fixtures" / "report-single-gpu"
#: the README's 8-GPU job: 4 ZeRO-3 training ranks and a T = 2, D = 2 vllm-serve server (examples/)
EIGHT_GPUS = dict(model="Qwen/Qwen3-30B-A3B", dtype="bfloat16", lora_rank=16, per_device_train_batch_size=8,
                  num_generations=8, world_size=4, distributed="zero3", offload_optimizer=True, offload_params=True,
                  use_vllm=True, vllm_mode="server", vllm_server_tensor_parallel_size=2,
                  vllm_server_data_parallel_size=2, vllm_server_gpu="H100")
#: issue 11's simulate case: Qwen2.5-0.5B LoRA with vLLM at 0.9 colocated on a T4
T4_SETUP = dict(model="Qwen/Qwen2.5-0.5B", lora_rank=16, use_vllm=True, vllm_gpu_memory_utilization=0.9,
                per_device_train_batch_size=2, num_generations=2, max_prompt_length=16, max_completion_length=16)
FAST = ("-p", "no:cacheprovider", "-p", "no:randomly")


def multi_gpu_record(server_gb: float = 80, measured_bytes: int | None = None) -> dict:
    """A record as the plugin makes it for ``gpu_budget(gb=80, vllm_gb=server_gb, setup=EIGHT_GPUS)``."""
    est = estimate(EIGHT_GPUS, gpu="H100")
    budget, server = 80 * GB, int(server_gb * GB)
    return {"nodeid": "tests/test_job.py::test_8_gpus", "mode": "measure" if measured_bytes else "estimate",
            "budget_bytes": budget, "budget_text": format_both(budget), "setup": est.setup.to_dict(),
            "predicted": predicted_dict(est, None),
            "measured": {"peak_reserved_bytes": measured_bytes, "reasons": {}} if measured_bytes else None,
            "baseline": None, "gpu": {"name": est.gpu.name, "total_bytes": est.gpu.total_bytes},
            "role_budgets": {"vllm_server": {"budget_bytes": server, "budget_text": format_both(server)}},
            "verdict": "passed", "reason": None}


def simulate_record() -> dict:
    """simulate mode's whole step: the estimate's torch tensors standing in for the simulation, completed by
    ``whole_step`` with the estimate's parts a simulation cannot see, as the plugin does."""
    est = estimate(T4_SETUP, gpu="T4")
    simulated = Breakdown(phases={phase: {name: num_bytes for name, num_bytes in est.breakdown.components(phase).items()
                                          if name not in FROM_ESTIMATE}
                                  for phase in est.breakdown.phase_names() if phase != "generation"},
                          source="simulate")
    whole = whole_step(simulated, est.breakdown)
    return {"nodeid": "tests/test_t4.py::test_t4", "mode": "simulate", "budget_bytes": est.gpu.total_bytes,
            "budget_text": format_both(est.gpu.total_bytes), "setup": est.setup.to_dict(),
            "predicted": {**whole.to_dict(), "assumptions": [], "warnings": []}, "measured": None, "baseline": None,
            "gpu": {"name": est.gpu.name, "total_bytes": est.gpu.total_bytes}, "verdict": "failed", "reason": "over"}


def _md_table(text: str, after: str) -> list[list[str]]:
    """The rows (cells) of the first Markdown table after the line ``after``."""
    lines = text.split(after, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


# -- a one-GPU estimate report is what it was --------------------------------------------------------------------
def test_single_gpu_reports_stay_byte_identical():
    records = json.loads((FIXTURES / "records.json").read_text(encoding="utf-8"))
    assert not any("roles" in r["predicted"] or "origins" in r["predicted"] for r in records)  # one GPU, estimated
    assert render_markdown(records) == (FIXTURES / "report.md").read_text(encoding="utf-8")
    # the HTML (its CSS and SVG) as its SHA-256: a copy of the page would repeat report/html.py's stylesheet
    page = render_html(records).encode("utf-8")
    assert hashlib.sha256(page).hexdigest() == (FIXTURES / "report.html.sha256").read_text().strip()


# -- per role --------------------------------------------------------------------------------------------------
def test_markdown_has_a_row_per_role_each_against_its_own_budget():
    record = multi_gpu_record(server_gb=20)
    roles = Breakdown.from_dict(record["predicted"])
    server = roles.role("vllm_server").peak_bytes
    assert server > 20 * GB  # the server is over its own 20 GB; the training ranks fit their 80 GB
    text = render_markdown([record])
    rows = {row[0]: row for row in _md_table(text, "### Per role")}
    assert list(rows) == ["rank0", "rank1+", "vllm_server", "host"]
    assert [rows[r][1] for r in rows] == ["1", "3", "4", "—"]  # GPUs: 4 trainer ranks, T × D = 4 server GPUs
    assert rows["rank0"][2] == rows["rank1+"][2] == "80 GB" and rows["vllm_server"][2] == "20 GB"
    assert rows["vllm_server"][3] == f"{format_gib(server)} (generation)"
    assert rows["vllm_server"][5] == "−" + format_gib(server - 20 * GB)  # its own headroom, not the trainers'
    assert "over its budget" in rows["vllm_server"][7]
    worst = roles.worst_role
    assert rows[worst][7] == "worst training GPU"
    assert rows[worst][5] == "+" + format_gib(80 * GB - roles.role(worst).peak_bytes)
    assert rows["host"][2] == "—" and rows["host"][7] == "host memory (CPU)"


def test_a_measurement_is_rank_0s_and_its_headroom_is_judged_on_it():
    measured = 70 * GIB
    rows = {row[0]: row for row in _md_table(render_markdown([multi_gpu_record(measured_bytes=measured)]),
                                             "### Per role")}
    assert rows["rank0"][4] == format_gib(measured) and rows["rank1+"][4] == "—"
    assert rows["rank0"][5] == "+" + format_gib(80 * GB - measured)
    # the terminal's table reads the same rows
    section = text_section(multi_gpu_record(measured_bytes=measured))
    assert re.search(r"role\s+GPUs\s+peak\s+phase\s+measured\s+budget\s+headroom", section)
    assert re.search(rf"rank0\s+1\s+\S+ GiB\s+\w+\s+{format_gib(measured)}\s+{format_gib(80 * GB)}\s+"
                     rf"{re.escape(format_gib(80 * GB - measured))}", section)


def test_html_draws_a_bar_per_role_against_its_own_budget_line():
    record = multi_gpu_record(server_gb=20)
    page = render_html([record])
    assert page.count('<svg class="roles"') == 1
    rows = re.findall(r'<tr class="role( over)?"><td>([^<]+)</td><td class="num">([^<]+)</td>'
                      r'<td class="num">([^<]+)</td>', page)
    assert [(name, gpus, budget) for _, name, gpus, budget in rows] == [
        ("rank0", "1", "80 GB"), ("rank1+", "3", "80 GB"), ("vllm_server", "4", "20 GB"), ("host", "—", "—")]
    assert [over for over, *_ in rows] == ["", "", " over", ""]
    # each GPU role's own budget line, on the bars' scale: the server's at 20 GB, the trainers' at 80 GB
    svg = page.split('<svg class="roles"', 1)[1].split("</svg>", 1)[0]
    lines = {title.split(" budget")[0]: float(x) for x, title in
             re.findall(r'<line class="role-budget" x1="([\d.]+)".*?<title>([^<]+)</title>', svg)}
    assert set(lines) == {"rank0", "rank1+", "vllm_server"}
    label = 130  # the label column of the per-phase bars
    assert (lines["rank0"] - label) / (lines["vllm_server"] - label) == pytest.approx(80 / 20, rel=1e-3)
    assert "vllm_kv_cache" in page.split('<div class="legend">', 1)[1].split("</div>", 1)[0]  # the server's parts


# -- simulate mode's origins -------------------------------------------------------------------------------------
def test_markdown_and_html_mark_what_the_estimate_supplied_in_simulate_mode():
    record = simulate_record()
    whole = Breakdown.from_dict(record["predicted"])
    rows = {row[0]: row for row in _md_table(render_markdown([record]), "### Where the whole step comes from")}
    assert rows["cuda_context"][2] == "[estimate]" and rows["vllm_kv_cache"][2] == "[estimate]"
    assert rows["allocator_slack"][2] == "[estimate]"
    assert rows["weights"][2] == "simulate; estimate in generation"  # simulated, but generation is the estimate's
    assert rows["vllm_kv_cache"][1] == format_gib(whole.components(whole.peak_phase)["vllm_kv_cache"])
    page = render_html([record])
    cells = dict(re.findall(r'</i>([a-z_]+)</td><td class="num">[^<]+</td><td>([^<]+)</td>', page))
    assert cells["vllm_kv_cache"] == "[estimate]" and cells["weights"].startswith("simulate")
    assert re.search(r"training \(predicted\) / vllm_kv_cache: [^<]+ \[estimate\]</title>", page)
    assert not re.search(r"/ weights: [^<]+ \[", page.split('<table class="origins"', 1)[0].split("training (", 1)[1])


def test_the_plugin_writes_both_formats_with_the_roles(pytester):
    """End to end: the marker of examples/test_grpo_8gpu_vllm_server.py, --gpu-budget-md and --gpu-budget-html."""
    pytester.makepyfile(test_job=textwrap.dedent(f"""
        import pytest

        @pytest.mark.gpu_budget(gb=80, vllm_gb=80, setup={EIGHT_GPUS!r})
        def test_job(): pass
    """))
    result = pytester.runpytest("--gpu-budget=estimate", "--gpu-budget-md=out.md", "--gpu-budget-html=out.html",
                                *FAST)
    result.assert_outcomes(passed=1)
    markdown = (pytester.path / "out.md").read_text(encoding="utf-8")
    assert [row[0] for row in _md_table(markdown, "### Per role")] == ["rank0", "rank1+", "vllm_server", "host"]
    page = (pytester.path / "out.html").read_text(encoding="utf-8")
    assert page.count('<tr class="role"') == 4 and page.count('class="role-budget"') == 3
