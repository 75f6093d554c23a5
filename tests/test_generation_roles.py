"""Budgets per role (the vLLM server's GPUs beside the training ranks) in the plugin, explain naming the role of a
vLLM server log, and fit moving generation (server mode, T, D) with the GPUs each role then needs."""

from __future__ import annotations

import json
import textwrap

import pytest

from pytest_gpumem import estimate
from pytest_gpumem.diagnose.explain import diagnose
from pytest_gpumem.diagnose.fit_gpus import fit_gpus, generation_layouts
from pytest_gpumem.errors import GpuMemError
from pytest_gpumem.plugin.marker import spec_from_marker
from pytest_gpumem.spec import GRPOSetup
from pytest_gpumem.units import GIB

FAST = ("-p", "no:cacheprovider", "-p", "no:unraisableexception", "-p", "no:hypothesispytest", "-p", "no:benchmark",
        "-p", "no:anyio")
SERVER = {"model": "Qwen/Qwen2.5-7B", "dtype": "bfloat16", "per_device_train_batch_size": 8, "num_generations": 8,
          "max_prompt_length": 256, "max_completion_length": 256, "use_vllm": True, "vllm_mode": "server",
          "world_size": 4, "distributed": "zero3", "vllm_server_tensor_parallel_size": 2,
          "vllm_server_data_parallel_size": 2, "vllm_server_gpu": "H100"}


def run(pytester, source, *args):
    pytester.makepyfile(test_mod=f"import pytest\nSERVER = {SERVER!r}\n" + textwrap.dedent(source))
    result = pytester.runpytest("--gpu-budget=estimate", "--gpu-budget-json=out.json", *FAST, "-rA", *args)
    report = json.loads((pytester.path / "out.json").read_text())
    return result, {t["nodeid"].split("::")[-1]: t for t in report["tests"]}


# -- the marker --------------------------------------------------------------------------------------------------
def test_marker_forms_for_the_server_budget():
    spec = spec_from_marker((), {"gb": 80, "vllm_gib": 70, "setup": SERVER})
    assert dict(spec.role_budgets)["vllm_server"][0] == 70 * GIB
    spec = spec_from_marker((), {"gb": 80, "vllm_size": "75 GB", "setup": SERVER})
    assert dict(spec.role_budgets)["vllm_server"][0] == 75 * 10**9
    # default: the server's card (vllm_server_gpu), else the training budget
    spec = spec_from_marker((), {"gb": 80, "setup": SERVER})
    assert dict(spec.role_budgets)["vllm_server"][0] == estimate(SERVER).role_totals()["vllm_server"]
    no_card = {k: v for k, v in SERVER.items() if k != "vllm_server_gpu"}
    assert dict(spec_from_marker((), {"gb": 80, "setup": no_card}).role_budgets)["vllm_server"][0] == 80 * 10**9
    assert spec_from_marker((), {"gb": 80, "setup": {**SERVER, "vllm_mode": "colocate", "vllm_server_gpu": None,
                                                    "vllm_server_tensor_parallel_size": None,
                                                    "vllm_server_data_parallel_size": None}}).role_budgets == ()


@pytest.mark.parametrize("kwargs,field", [
    ({"gb": 80, "vllm_gb": 80, "vllm_gib": 70, "setup": SERVER}, "vllm_gib"),
    ({"gb": 80, "vllm_gb": -1, "setup": SERVER}, "vllm_gb"),
    ({"gb": 80, "vllm_size": "80", "setup": SERVER}, "vllm_size"),
    ({"gb": 80, "vllm_gb": 80, "setup": {"model": "Qwen/Qwen2.5-7B"}}, "vllm_gb"),
])
def test_bad_server_budgets_name_the_argument(kwargs, field):
    with pytest.raises(GpuMemError) as info:
        spec_from_marker((), kwargs)
    assert info.value.field == field


def test_each_role_is_judged_against_its_own_budget(pytester):
    e = estimate(SERVER)
    server_peak = e.breakdown.role("vllm_server").peak_bytes / GIB
    trainer_peak = e.peak_bytes / GIB
    result, tests = run(pytester, f"""
        @pytest.mark.gpu_budget(gib={trainer_peak + 1:.3f}, vllm_gib={server_peak + 1:.3f}, setup=SERVER)
        def test_both_fit(): pass

        @pytest.mark.gpu_budget(gib={trainer_peak + 1:.3f}, vllm_gib={server_peak - 1:.3f}, setup=SERVER)
        def test_server_over(): pass

        @pytest.mark.gpu_budget(gib=80, vllm_gb=80, setup={{**SERVER, "vllm_server_tensor_parallel_size": 3}})
        def test_bad_tp(): pass

        @pytest.mark.gpu_budget(gib=80, setup={{**SERVER, "vllm_mode": "colocate", "vllm_server_gpu": None,
                                               "vllm_server_tensor_parallel_size": None,
                                               "vllm_server_data_parallel_size": None,
                                               "vllm_tensor_parallel_size": 3}})
        def test_tp_not_dividing_the_gpus(): pass

        def test_unrelated(): pass
    """)
    result.assert_outcomes(passed=2, failed=1, errors=2)
    assert "INTERNALERROR" not in result.stdout.str()
    over = tests["test_server_over"]
    assert over["verdict"] == "failed" and over["reason"].startswith("vllm_server: predicted peak")
    assert "server utilisation −0.05" in over["reason"]  # the server's own levers, not the trainer's
    budget = over["role_budgets"]["vllm_server"]["budget_bytes"]
    assert budget == pytest.approx((server_peak - 1) * GIB, abs=0.001 * GIB)
    result.stdout.fnmatch_lines(["*vllm_server_tensor_parallel_size*must be divisible by tensor parallel size*"])
    result.stdout.fnmatch_lines(["*tensor_parallel_size (3) must divide world size (4) evenly*"])
    # the section: a row per role, each with its own budget and headroom
    result.stdout.fnmatch_lines(["role*GPUs*peak*phase*budget*headroom*", "rank0*1*", "rank1+*3*",
                                 f"vllm_server*4*{server_peak:.2f} GiB*{server_peak + 1:.2f} GiB*1.00 GiB*"])


# -- explain -----------------------------------------------------------------------------------------------------
SERVER_OOM = ("(VllmWorker rank=1 pid=2978) ERROR 03-19 07:27:53 [multiproc_executor.py:375] torch.OutOfMemoryError: "
              "CUDA out of memory. Tried to allocate 1.74 GiB. GPU 1 has a total capacity of 79.11 GiB of which "
              "605.88 MiB is free. Process 133288 has 78.50 GiB memory in use. Of the allocated memory 70.21 GiB is "
              "allocated by PyTorch, and 185.98 MiB is reserved by PyTorch but unallocated.")
#: a vLLM V1 start-up refusal as an EngineCore logs it (tests/fixtures/oom-messages.json vllm-012)
SERVER_REFUSAL = ("[2026-02-24T20:21:58Z] (EngineCore_DP0 pid=6940) ValueError: Free memory on device cuda:1 "
                  "(19.77/22.05 GiB) on startup is less than desired GPU memory utilization (0.9, 19.84 GiB). "
                  "Decrease GPU memory utilization or reduce GPU memory used by other processes.")


def test_explain_names_the_server_role_from_its_log():
    d = diagnose(SERVER_OOM, setup=SERVER)
    assert d.role == "vllm_server" and "VllmWorker rank=1" in d.role_evidence
    assert d.to_dict()["role"] == "vllm_server"
    assert d.predicted_phase in d.estimate.breakdown.role("vllm_server").phases
    assert "role: vllm_server" in d.render() and "of vllm_server" in d.render()
    assert all(lever.name.startswith("server") for lever in d.levers)
    refusal = diagnose(SERVER_REFUSAL, setup=SERVER)
    assert refusal.role == "vllm_server" and refusal.predicted_phase == "persistent"
    assert refusal.estimate.role_totals()["vllm_server"] == round(22.05 * GIB)  # the server's card from the log
    assert any("vllm_server_gpu_memory_utilization=0.9" in note for note in refusal.notes)
    assert diagnose(SERVER_REFUSAL).role == "vllm_server"  # without a setup: the prefix alone


def test_explain_names_a_training_rank():
    text = SERVER_OOM.replace("(VllmWorker rank=1 pid=2978) ERROR 03-19 07:27:53 [multiproc_executor.py:375]",
                              "[rank3]:")
    d = diagnose(text, setup=SERVER)
    assert d.role == "rank1+" and "[rank3]" in d.role_evidence
    colocated = {**SERVER, "vllm_mode": "colocate", "vllm_server_gpu": None, "vllm_server_tensor_parallel_size": None,
                 "vllm_server_data_parallel_size": None}
    assert diagnose(SERVER_REFUSAL, setup=colocated).role == "rank0"  # colocated vLLM runs in a training rank


# -- fit ----------------------------------------------------------------------------------------------------------
def test_fit_tries_where_generation_runs_and_counts_gpus_per_role():
    setup = GRPOSetup.from_dict({**SERVER, "vllm_mode": "colocate", "vllm_server_gpu": None,
                                 "vllm_server_tensor_parallel_size": None, "vllm_server_data_parallel_size": None,
                                 "world_size": 1, "distributed": "none"})
    labels = [label for label, _, _ in generation_layouts(setup, 8)]
    assert labels[0] == "" and "colocated vLLM T=2" in labels and "vLLM server T=2 D=2" in labels
    found = fit_gpus(setup, "H100", 8)
    assert found.fits
    for launch in found.launches:
        assert sum(launch.gpus_per_role.values()) == 8
    served = [f for f in found.launches if "vLLM server T=2 D=2" in f.label]
    assert served and served[0].gpus_per_role == {"training": 4, "vllm_server": 4}
    data = found.to_dict()
    assert sum(data["gpus_per_role"].values()) == 8
    assert found.chosen.setup.vllm_mode == "colocate"  # the input's layout fits: kept


def test_simulate_mode_keeps_the_servers_estimated_role(monkeypatch):
    """The training step is simulated; a vLLM server GPU runs none, so its role stays the estimate's."""
    import sys
    import types

    from pytest_gpumem.breakdown import Breakdown
    from pytest_gpumem.plugin import manager, mode
    from pytest_gpumem.record import predicted_dict

    fake = types.ModuleType("fake_simulate")
    fake.simulate = lambda setup: Breakdown(phases={"persistent": {"weights": 100}, "training": {"weights": 100}},
                                            source="simulate")
    monkeypatch.setitem(sys.modules, "fake_simulate", fake)
    monkeypatch.setattr(mode, "SIMULATE_MODULE", "fake_simulate")
    one_gpu = {**SERVER, "world_size": 1, "distributed": "none"}
    e = estimate(one_gpu, gpu="H100")
    data = manager._simulated_whole_step(e.setup, e, predicted_dict(e, None))
    shown = Breakdown.from_dict(data)
    assert shown.role("vllm_server").peak_bytes == e.breakdown.role("vllm_server").peak_bytes
    assert shown.worst_role == "rank0" and shown.role("rank0").peak_bytes == data["peak_bytes"]
