"""The estimator against independent hand calculations from shared/docs/memory-model.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pytest_gpumem import GRPOSetup, estimate
from pytest_gpumem.breakdown import Component, Phase
from pytest_gpumem.errors import GpuMemError, SetupError, UnknownModelError
from pytest_gpumem.gpus import resolve_gpu
from pytest_gpumem.models import registry, registry_record, resolve_model
from pytest_gpumem.predict.analytic.constants import CUDA_CONTEXT_BYTES, NF4_BYTES_PER_PARAM
from pytest_gpumem.predict.analytic.vllm import kv_cache_bytes as vllm_kv_cache_bytes
from pytest_gpumem.units import GB, GIB, MIB, format_both, parse_size

LLAMA_8B = "meta-llama/Llama-3.1-8B"
QWEN_05B = "Qwen/Qwen2.5-0.5B"


# -- parameter counts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(registry()))
def test_param_count_matches_published(name):
    spec = registry()[name]
    record = registry_record(name)
    published = record["published_total_params"]
    if record.get("published_total_params_exact") and record.get("computed_scope", "").startswith("whole"):
        assert spec.num_params == published
    else:
        # rounded model-card figures ("3.8B") or KerasHub's 262144-row Gemma vocabulary: within 1%
        assert abs(spec.num_params - published) / published < 0.01
    assert spec.num_params == record["computed_total_params"]


@pytest.mark.parametrize("name,expected", [
    ("meta-llama/Llama-3.1-8B", 8_030_261_248), ("Qwen/Qwen2.5-0.5B", 494_032_768),
    ("google/gemma-3-1b-it", 999_885_952), ("meta-llama/Llama-3.2-1B", 1_235_814_400),
])
def test_reference_param_counts(name, expected):
    assert resolve_model(name).num_params == expected


def test_registry_has_twenty_models_and_a_moe():
    specs = registry()
    assert len(specs) >= 20
    assert any(spec.is_moe for spec in specs.values())


def test_inline_config_and_aliases():
    spec = resolve_model({"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                          "tie_word_embeddings": False})
    # embedding + head 2·1000·64, per layer q/o 2·64·64, k/v 2·64·32, MLP 3·64·128, 2 norms; final norm
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    assert spec.num_params == 2 * 1000 * 64 + 2 * per_layer + 64
    assert resolve_model("qwen/qwen2.5-0.5b-instruct").name == QWEN_05B


def test_local_config_path(tmp_path):
    record = registry_record(QWEN_05B)
    config = dict(record["config"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert resolve_model(str(tmp_path)).num_params == 494_032_768


def test_hf_cache_is_read_offline(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2}))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model("acme/tiny").source.startswith("hf-cache:")


def test_unknown_model_lists_close_matches():
    with pytest.raises(UnknownModelError) as info:
        resolve_model("Qwen/Qwen2.5-7B-Instrukt")
    assert info.value.field == "model"
    assert "Qwen/Qwen2.5-7B" in str(info.value)


# -- LoRA, NF4, KV --------------------------------------------------------------------------------------
def test_lora_count_llama_8b_r16_all_linear():
    """memory-model.md §4: Llama-3.1-8B, r = 16, all seven projections → 41,943,040."""
    setup = GRPOSetup.from_dict({"model": LLAMA_8B, "lora_rank": 16, "lora_target_modules": "all-linear"})
    result = estimate(setup)
    assert result.breakdown.components(Phase.PERSISTENT)[Component.LORA.value] == 41_943_040 * 4  # fp32
    # by hand: 32 · 16 · [(4096+4096) + 2(4096+1024) + (4096+4096) + 2(4096+14336) + (14336+4096)]
    assert 32 * 16 * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 2 * (4096 + 14336) + (14336 + 4096)) \
        == 41_943_040


def test_peft_default_targets_are_q_and_v():
    setup = GRPOSetup.from_dict({"model": LLAMA_8B, "lora_rank": 8})
    assert setup.resolve_target_modules() == ("q_proj", "v_proj")
    lora = estimate(setup).breakdown.components("persistent")["lora_params"]
    assert lora == 32 * 8 * ((4096 + 4096) + (4096 + 1024)) * 4


def test_nf4_weight_bytes():
    """QLoRA: 4 bits + fp32 absmax per 64 = 0.5625 B/param on decoder Linears; the rest stays 16-bit."""
    spec = resolve_model(LLAMA_8B)
    setup = GRPOSetup.from_dict({"model": LLAMA_8B, "load_in_4bit": True, "lora_rank": 16, "dtype": "bfloat16"})
    weights = estimate(setup).breakdown.components("persistent")["weights"]
    linear = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336)
    assert spec.linear_params() == linear
    assert weights == int(linear * 0.5625) + (spec.num_params - linear) * 2
    assert NF4_BYTES_PER_PARAM == 0.5625
    # ≈ 5.5 GiB for an 8B model in 4-bit: the figure users quote
    assert 5.0 * GIB < weights < 6.0 * GIB


def test_kv_bytes_per_token():
    # 2 · n_layers · kv_heads · head_dim · 2 B
    assert resolve_model(LLAMA_8B).kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2 == 131_072
    assert resolve_model("Qwen/Qwen2.5-7B").kv_bytes_per_token() == 2 * 28 * 4 * 128 * 2
    assert resolve_model(LLAMA_8B).kv_bytes_per_token(dtype_bytes=1) == 65_536  # fp8 halves it


def test_hf_generate_kv_cache_respects_sliding_windows():
    setup = GRPOSetup.from_dict({"model": "google/gemma-3-1b-it", "per_device_train_batch_size": 4,
                                 "num_generations": 4, "max_prompt_length": 1024, "max_completion_length": 1024})
    generation = estimate(setup).breakdown.components("generation")
    spec = resolve_model("google/gemma-3-1b-it")
    per_layer_token = 2 * spec.kv_out * 2
    expected = 4 * per_layer_token * (spec.num_full_attention_layers * 2048 + spec.num_sliding_layers * 512)
    assert generation["generate_kv_cache"] == expected


# -- vLLM ----------------------------------------------------------------------------------------------
def test_vllm_startup_log_arithmetic():
    """Published start-up log: 79.33 GiB, util 0.90 → 71.39 GiB budget; weights 9.69, non-torch 1.27,
    activation peak 2.95 → KV 57.48 GiB (memory-model.md §3)."""
    budget = 0.90 * 79.33 * GIB
    assert abs(budget / GIB - 71.39) < 0.01
    kv = vllm_kv_cache_bytes(int(budget), int(9.69 * GIB), int(2.95 * GIB), int(1.27 * GIB))
    assert abs(kv / GIB - 57.48) < 0.01


def test_colocated_vllm_reservation_is_util_times_total():
    setup = GRPOSetup.from_dict({"model": QWEN_05B, "use_vllm": True, "vllm_gpu_memory_utilization": 0.3,
                                 "dtype": "bfloat16"})
    result = estimate(setup, gpu="24GiB")
    persistent = result.breakdown.components("persistent")
    reservation = sum(v for k, v in persistent.items() if k.startswith("vllm_"))
    assert reservation == int(0.3 * 24 * GIB)
    assert persistent["vllm_weights"] == 494_032_768 * 2


def test_vllm_refusal_is_predicted():
    """Colocate: the policy is on the GPU before vLLM starts; free < util × total → vLLM refuses."""
    setup = GRPOSetup.from_dict({"model": "Qwen/Qwen2.5-7B", "lora_rank": 16, "use_vllm": True,
                                 "vllm_gpu_memory_utilization": 0.9})
    result = estimate(setup, gpu="L4")
    assert any("vLLM would refuse to start: free memory" in w for w in result.warnings)
    assert not result.fits()


def test_vllm_kv_too_small_for_one_sequence():
    setup = GRPOSetup.from_dict({"model": QWEN_05B, "use_vllm": True, "vllm_gpu_memory_utilization": 0.05,
                                 "dtype": "bfloat16", "lora_rank": 16})
    result = estimate(setup, gpu="T4")
    assert any("cannot hold one sequence" in w for w in result.warnings)


def test_sleep_mode_frees_vllm_outside_generation():
    base = {"model": QWEN_05B, "use_vllm": True, "dtype": "bfloat16", "lora_rank": 16}
    awake = estimate({**base}, gpu="L4").breakdown
    asleep = estimate({**base, "vllm_enable_sleep_mode": True}, gpu="L4").breakdown
    assert "vllm_kv_cache" in asleep.components("generation")
    assert "vllm_kv_cache" not in asleep.components("training")
    assert asleep.total("training") < awake.total("training")


def test_server_mode_puts_nothing_on_the_trainer_gpu():
    result = estimate({"model": QWEN_05B, "use_vllm": True, "vllm_mode": "server"}, gpu="L4")
    assert not any(k.startswith("vllm_") for k in result.breakdown.component_names())


# -- model states, logits --------------------------------------------------------------------------------
def test_full_ft_from_string_is_16_bytes_per_param():
    """fp32 weights 4 + grads 4 + AdamW 8 = 16 B/param (memory-model.md §2); bf16: 2 + 2 + 4 = 8."""
    psi = 494_032_768
    for dtype, per_param in (("float32", 16), ("bfloat16", 8)):
        step = estimate({"model": QWEN_05B, "dtype": dtype}).breakdown.components("optimizer_step")
        states = step["weights"] + step["gradients"] + step["optimizer_states"]
        assert states == psi * per_param


def test_reference_model_only_without_peft():
    full = estimate({"model": QWEN_05B, "beta": 0.04}).breakdown.components("persistent")
    assert full["reference_weights"] == 494_032_768 * 4
    lora = estimate({"model": QWEN_05B, "beta": 0.04, "lora_rank": 16}).breakdown.components("persistent")
    assert "reference_weights" not in lora


def test_materialized_logits_multiplier():
    """Qwen2.5 vocab 151,936, b = 8, C = 512: backward logits peak 16.3 B/element ≈ 9.4 GiB."""
    setup = {"model": QWEN_05B, "logits": "materialized", "per_device_train_batch_size": 8,
             "max_completion_length": 512, "dtype": "bfloat16"}
    result = estimate(setup)
    logits = result.breakdown.components("training")["logits"]
    assert logits == int(8 * 512 * 151_936 * 16.3)
    assert 9.3 * GIB < logits < 9.5 * GIB
    # "Tried to allocate": one fp32 logits tensor rows × (C+1) × V × 4
    assert result.largest_allocation_bytes == 8 * 513 * 151_936 * 4
    assert "logits" in result.largest_allocation_name
    assert result.peak_phase == "training"


def test_chunked_logits_are_much_smaller():
    base = {"model": QWEN_05B, "dtype": "bfloat16", "lora_rank": 16}
    materialized = estimate({**base, "logits": "materialized"}).peak_bytes
    chunked = estimate({**base, "logits": "chunked"}).peak_bytes
    assert chunked < materialized / 2


def test_trl_version_decides_the_logits_mode():
    assert GRPOSetup.from_dict({"model": QWEN_05B, "trl_version": "1.9.0"}).logits == "materialized"
    assert GRPOSetup.from_dict({"model": QWEN_05B, "trl_version": "1.16.0"}).logits == "chunked"
    result = estimate({"model": QWEN_05B, "trl_version": "1.9.0"})
    assert any("trl 1.9.0 → materialised" in a for a in result.assumptions)


def test_checkpointing_keeps_one_layer_input_per_layer():
    setup = {"model": QWEN_05B, "dtype": "bfloat16", "per_device_train_batch_size": 4, "num_generations": 4,
             "max_prompt_length": 256, "max_completion_length": 256, "lora_rank": 16}
    on = estimate({**setup, "gradient_checkpointing": True}).breakdown.components("training")
    off = estimate({**setup, "gradient_checkpointing": False}).breakdown.components("training")
    assert on["activations"] == 4 * 512 * 896 * 2 * (24 + 2)
    assert off["activations"] > 10 * on["activations"]


def test_optimizer_choices():
    base = {"model": QWEN_05B, "dtype": "bfloat16"}
    fused = estimate({**base, "optim": "adamw_torch_fused"}).breakdown.components("optimizer_step")
    foreach = estimate({**base, "optim": "adamw_torch"}).breakdown.components("optimizer_step")
    eight_bit = estimate({**base, "optim": "adamw_8bit"}).breakdown.components("persistent")
    assert "optimizer_step_temp" not in fused
    assert foreach["optimizer_step_temp"] == 494_032_768 * 2
    assert eight_bit["optimizer_states"] == 494_032_768 * 2


def test_scoring_phase_only_when_needed():
    assert "scoring" not in estimate({"model": QWEN_05B}).breakdown.phases
    assert "scoring" in estimate({"model": QWEN_05B, "beta": 0.04}).breakdown.phases
    assert "scoring" in estimate({"model": QWEN_05B, "num_iterations": 2}).breakdown.phases


def test_fits_and_headroom():
    result = estimate({"model": QWEN_05B, "dtype": "bfloat16", "lora_rank": 16}, gpu="T4")
    assert result.fits()
    assert result.headroom_bytes == result.total_bytes - result.peak_bytes
    assert result.fits(total_bytes=result.peak_bytes)
    assert not result.fits(total_bytes=result.peak_bytes - 1)
    with pytest.raises(GpuMemError):
        estimate({"model": QWEN_05B}).fits()


def test_cuda_context_is_everywhere():
    breakdown = estimate({"model": QWEN_05B}).breakdown
    for phase in breakdown.phase_names():
        assert breakdown.components(phase)["cuda_context"] == CUDA_CONTEXT_BYTES


def test_unsloth_defaults_and_shared_weights():
    setup = GRPOSetup.from_dict({"model": "meta-llama/Llama-3.2-3B", "backend": "unsloth"})
    assert (setup.load_in_4bit, setup.lora_rank, setup.optim, setup.num_generations) == (True, 16, "adamw_8bit", 8)
    persistent = estimate(setup, gpu="L4").breakdown.components("persistent")
    assert "weights" not in persistent  # one copy, inside vLLM
    assert persistent["vllm_weights"] > 0


# -- setups: validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("data,field,text", [
    ({"model": QWEN_05B, "num_generations": 3}, "per_device_train_batch_size", "must be divisible by num_generations"),
    ({"model": QWEN_05B, "num_generations": 1}, "num_generations", "at least 2"),
    ({"model": QWEN_05B, "per_device_train_batch_size": 0}, "per_device_train_batch_size", "≥ 1"),
    ({"model": QWEN_05B, "lora_rank": -1}, "lora_rank", "≥ 1"),
    ({"model": QWEN_05B, "load_in_4bit": True}, "load_in_4bit", "lora_rank"),
    ({"model": QWEN_05B, "dtype": "int8"}, "dtype", "float32"),
    ({"model": QWEN_05B, "vllm_gpu_memory_utilization": 1.5}, "vllm_gpu_memory_utilization", "(0, 1]"),
    ({"model": QWEN_05B, "per_device_train_batch_sise": 8}, "per_device_train_batch_sise", "did you mean"),
    ({"model": QWEN_05B, "gradient_checkpointing": "yes"}, "gradient_checkpointing", "unsloth"),
    ({"model": QWEN_05B, "optim": "adam"}, "optim", "adamw"),
    ({"per_device_train_batch_size": 8}, "model", "no model"),
    ({"model": QWEN_05B, "max_seq_length": 256, "max_prompt_length": 512}, "max_seq_length", "no room"),
])
def test_invalid_setups_name_the_field(data, field, text):
    with pytest.raises(SetupError) as info:
        GRPOSetup.from_dict(data)
    assert info.value.field == field
    assert text in str(info.value)
    assert "fix:" in str(info.value)


def test_unsloth_resets_batch_instead_of_raising():
    setup = GRPOSetup.from_dict({"model": QWEN_05B, "backend": "unsloth", "per_device_train_batch_size": 3})
    assert setup.per_device_train_batch_size == 8
    assert "resets per_device_train_batch_size" in estimate(setup).assumptions[0]


def test_unsloth_vocabulary_max_seq_length():
    setup = GRPOSetup.from_dict({"model": QWEN_05B, "max_seq_length": 1024, "max_prompt_length": 256})
    assert setup.max_completion_length == 768


def test_alias_and_files(tmp_path):
    path = tmp_path / "setup.toml"
    path.write_text('model = "Qwen/Qwen2.5-0.5B"\ngpu_memory_utilization = 0.4\nuse_vllm = true\n')
    setup = GRPOSetup.from_file(path)
    assert setup.vllm_gpu_memory_utilization == 0.4
    json_path = tmp_path / "setup.json"
    json_path.write_text(json.dumps(setup.to_dict()))
    assert GRPOSetup.from_file(json_path) == setup
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SetupError, match="not valid JSON"):
        GRPOSetup.from_file(bad)


def test_from_trl_reads_real_config_objects():
    trl = pytest.importorskip("trl", reason="trl is in the test extra")
    peft = pytest.importorskip("peft")
    config = trl.GRPOConfig(output_dir="/tmp/x", per_device_train_batch_size=4, num_generations=4,
                            max_completion_length=128, beta=0.04, report_to="none", use_cpu=True, bf16=False)
    lora = peft.LoraConfig(r=8, target_modules=["q_proj", "k_proj"])
    setup = GRPOSetup.from_trl(config, model=QWEN_05B, peft_config=lora)
    assert (setup.per_device_train_batch_size, setup.num_generations, setup.max_completion_length) == (4, 4, 128)
    assert setup.lora_rank == 8 and setup.lora_target_modules == ("k_proj", "q_proj")
    assert setup.beta == 0.04 and setup.optim == config.optim.value
    assert setup.bf16 is False  # the config's precision flags are read: fp32 weights + bf16=False = pure fp32


# -- units and GPUs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [("17 GiB", 17 * GIB), ("24GB", 24 * GB), ("512 mib", 512 * MIB),
                                           ("1.5 GB", 1_500_000_000), ("0.5GiB", GIB // 2)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["17", "17 GB of RAM", "GB", "-1 GB", "17 gigs", "", "1e3 GB"])
def test_parse_size_rejects(text):
    with pytest.raises(GpuMemError) as info:
        parse_size(text, field="size")
    assert info.value.field == "size"


def test_format_both_units():
    assert format_both(17 * GB) == "17 GB = 15.83 GiB"
    assert format_both(20 * GIB, "gib") == "20 GiB = 21.47 GB"


@pytest.mark.parametrize("name,gib", [("L4", 22.03), ("T4", 14.74), ("A100-80GB", 79.25), ("H100", 79.11),
                                      ("rtx 4090", 23.64), ("A100-40GB", 39.5)])
def test_gpu_names_map_to_torch_totals(name, gib):
    assert abs(resolve_gpu(name).total_bytes / GIB - gib) < 0.005


def test_gpu_sizes_and_errors():
    assert resolve_gpu("24GiB").total_bytes == 24 * GIB
    assert resolve_gpu("80GB").total_bytes == 80 * GB
    with pytest.raises(GpuMemError, match="A100-40GB or A100-80GB"):
        resolve_gpu("A100")
    with pytest.raises(GpuMemError, match="unknown GPU"):
        resolve_gpu("Voodoo 5")


# -- CLI ------------------------------------------------------------------------------------------------
def _gpumem(*args):
    return subprocess.run([sys.executable, "-m", "pytest_gpumem.cli", *args], capture_output=True, text=True)


def test_cli_json_shape():
    result = _gpumem("estimate", "--model", QWEN_05B, "--dtype", "bfloat16", "--lora-rank", "16",
                     "--gpu", "L4", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) >= {"peak_bytes", "peak_phase", "largest_allocation_bytes", "fits", "total_bytes", "phases",
                         "assumptions", "setup", "model"}
    assert data["fits"] is True
    assert data["model"]["num_params"] == 494_032_768
    assert data["peak_bytes"] == max(sum(c.values()) for c in data["phases"].values())
    assert data["setup"]["lora_rank"] == 16


def test_cli_exit_codes(tmp_path):
    assert _gpumem("estimate", "--model", "Qwen/Qwen2.5-7B", "--gpu", "T4").returncode == 1
    bad = _gpumem("estimate", "--model", QWEN_05B, "--num-generations", "3")
    assert bad.returncode == 2 and "num_generations" in bad.stderr and "Traceback" not in bad.stderr
    setup_file = tmp_path / "s.json"
    setup_file.write_text(json.dumps({"model": QWEN_05B, "lora_rank": 16, "dtype": "bfloat16"}))
    table = _gpumem("estimate", "--setup", str(setup_file), "--gpu", "24GiB")
    assert table.returncode == 0 and "peak phase" in table.stdout and "FITS" in table.stdout


def test_cli_models_json():
    result = _gpumem("models", "--json")
    rows = json.loads(result.stdout)
    assert {"name", "aliases", "num_params", "hidden_size"} <= set(rows[0])
    assert len(rows) >= 20


def test_import_does_not_pull_torch():
    code = "import sys, pytest_gpumem; pytest_gpumem.estimate({'model': 'Qwen/Qwen2.5-0.5B'}); " \
           "import pytest_gpumem.cli; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr
