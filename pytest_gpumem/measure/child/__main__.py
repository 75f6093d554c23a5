"""The measurement child process: ``python -m pytest_gpumem.measure.child REQUEST.json RESULT.json``.

Started by :func:`pytest_gpumem.runner.run` in a fresh process (a new CUDA context, nothing left over from
earlier tests), it runs ``steps`` optimizer steps of a real TRL ``GRPOTrainer`` (HF generate or vLLM
colocate) or of Unsloth's, measures every phase and writes one JSON result. An OOM is caught and written
as a structured result; anything else that goes wrong is written as ``status: "crashed"`` with the
traceback's tail. Progress lines go to stderr, prefixed with :data:`PROGRESS_PREFIX`.

Phases are found by wrapping the trainer's own methods (trl 1.16 ``trl/trainer/grpo_trainer.py``):
``training_step`` (training; it calls ``_prepare_inputs`` → generation and scoring), ``_generate_and_score_
completions`` (scoring: rewards, old/reference log-probs; it contains generation), ``_generate`` (generation:
HF ``generate`` or vLLM, weight sync included), and transformers' ``_clip_grad_norm`` plus the
``on_pre_optimizer_step`` / ``on_optimizer_step`` callbacks (optimizer step; transformers ``trainer.py``).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ...breakdown import Phase
from ..snapshot import (MemorySnapshot, NvmlSampler, PhaseTracker, RssSampler, no_cuda_reason, nvml, nvml_handle,
                      nvml_memory, torch_device_uuid)
from ...units import format_gib
from ...versions import PACKAGE_VERSION, installed_versions

PROGRESS_PREFIX = "GPUMEM-PROGRESS "
RESULT_SCHEMA = "pytest-gpumem/run/1"

#: Faults a request can ask for, to test the parent's handling of children that fail (tests/test_runner.py).
FAULTS = ("exit-early", "segv-early", "hang-early", "raise-early", "oom-in-generation")


class _Skip(Exception):
    """The run cannot happen here (no CUDA device, backend not installed): a skip with its reason."""


def _is_oom(exc: BaseException, torch_module) -> bool:
    if torch_module is not None:
        types = tuple(t for t in (getattr(torch_module, "OutOfMemoryError", None),
                                  getattr(getattr(torch_module, "cuda", None), "OutOfMemoryError", None)) if t)
        if types and isinstance(exc, types):
            return True
    text = str(exc)
    if "out of memory" in text.lower():
        return True
    try:  # vLLM's start-up refusals ("Free memory on device ...", "... KV cache ...") are OOMs too
        from ...diagnose.explain import parse_oom
    except ImportError:
        return False
    try:
        return parse_oom(text) is not None
    except Exception:  # noqa: BLE001 - a parser problem must not hide the run's own failure
        return False


def parse_oom_text(text: str) -> tuple[dict | None, str | None]:
    """The OOM message parsed by :mod:`pytest_gpumem.explain` when it is available, else the reason why not."""
    try:
        from ...diagnose.explain import parse_oom
    except ImportError as exc:
        return None, f"no OOM parser available ({exc})"
    try:
        parsed = parse_oom(text)
    except Exception as exc:  # noqa: BLE001
        return None, f"the OOM parser failed: {type(exc).__name__}: {exc}"
    if parsed is None:
        return None, "the OOM parser found no OOM message in the text"
    return (parsed.to_dict() if hasattr(parsed, "to_dict") else dict(vars(parsed))), None


def _versions() -> dict[str, str | None]:
    result: dict[str, str | None] = {"python": platform.python_version(), "pytest_gpumem": PACKAGE_VERSION}
    result.update(installed_versions(("torch", "transformers", "trl", "peft", "accelerate", "datasets", "vllm",
                                      "unsloth", "bitsandbytes", "tokenizers", "nvidia-ml-py")))
    torch = sys.modules.get("torch")
    if torch is not None:
        result["torch_cuda"] = getattr(torch.version, "cuda", None)
    module, _ = nvml()
    if module is not None:
        try:
            driver = module.nvmlSystemGetDriverVersion()
            result["nvidia_driver"] = driver.decode() if isinstance(driver, bytes) else str(driver)
        except module.NVMLError:
            result["nvidia_driver"] = None
    return result


def _tensor_bytes(tensors) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        if tensor is None or not hasattr(tensor, "data_ptr"):
            continue
        key = tensor.data_ptr()
        if key in seen or tensor.device.type == "meta":
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (AdamW exp_avg/exp_avg_sq, bnb 8-bit states)."""
    if optimizer is None:
        return 0
    tensors = []
    for state in getattr(optimizer, "state", {}).values():
        if isinstance(state, dict):
            tensors.extend(v for v in state.values() if hasattr(v, "data_ptr") and v.dim() > 0)
    return _tensor_bytes(tensors)


def gradient_bytes(model) -> int:
    return _tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)


class Child:
    def __init__(self, request: dict[str, Any]):
        self.request = request
        self.started = time.perf_counter()
        self.result: dict[str, Any] = {
            "schema": RESULT_SCHEMA, "status": "crashed", "reason": None,
            "steps_requested": int(request.get("steps", 2)), "steps_completed": 0,
            "backend": request.get("backend"), "setup": request.get("setup"),
            "device": {"requested": request.get("device", "auto"), "type": None},
            "timings_s": {}, "host_memory": {}, "gpu": {"reasons": {}}, "phases": {}, "breakdown": None,
            "oom": None, "tokens": {}, "notes": [], "stage": "start", "pid": os.getpid(),
        }
        self.torch = None
        self.tracker: PhaseTracker | None = None
        self.trainer = None
        self.cuda = False
        self.nvml_baseline: dict[str, Any] | None = None
        self.fault = request.get("fault")
        self._fault_fired = False
        self.step_started: float | None = None
        self.snapshots: dict[str, Any] = {}
        self.own_tokenizer = False
        self.gpu_reason: str | None = None
        self.setup = None

    # -- output --------------------------------------------------------------------------------------
    def progress(self, message: str) -> None:
        elapsed = time.perf_counter() - self.started
        line = json.dumps({"t": round(elapsed, 2), "message": message, "stage": self.result["stage"]})
        print(PROGRESS_PREFIX + line, file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        self.result["notes"].append(text)

    # -- the run -------------------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        self.progress(f"child started (pid {os.getpid()}, python {platform.python_version()})")
        self._early_faults()
        try:
            self._run()
        except _Skip as skip:
            self.result["status"], self.result["reason"] = "skipped", str(skip)
            self.gpu_reason = self.gpu_reason or f"not measured: {skip}"
            self.progress(f"skipped: {skip}")
        except BaseException as exc:  # noqa: BLE001 - reported, never propagated
            if self.tracker is not None:
                self.tracker.note_failure()
            if _is_oom(exc, self.torch):
                self._record_oom(exc)
            else:
                self._record_crash(exc)
        finally:
            self.result["timings_s"]["total"] = round(time.perf_counter() - self.started, 3)
            self._finish_measurements()
            self.result["versions"] = _versions()
        return self.result

    def _early_faults(self) -> None:
        if self.fault == "exit-early":
            os._exit(137)
        if self.fault == "segv-early":
            os.kill(os.getpid(), signal.SIGSEGV)
        if self.fault == "hang-early":
            time.sleep(3600)

    def _stage(self, stage: str) -> None:
        self.result["stage"] = stage

    def _run(self) -> None:
        from ...spec import GRPOSetup

        setup = GRPOSetup.from_dict(self.request["setup"])
        self.setup = setup
        if self.fault == "raise-early":
            raise RuntimeError("injected failure (fault='raise-early')")
        self._take_nvml_baseline()

        self._stage("import")
        t0 = time.perf_counter()
        import torch

        self.torch = torch
        self.result["timings_s"]["import_torch"] = round(time.perf_counter() - t0, 3)
        self._choose_device()
        self._check_backend()

        t0 = time.perf_counter()
        if setup.backend == "unsloth":
            import unsloth  # noqa: F401 - must be imported before trl/transformers to patch them
        import datasets  # noqa: F401
        import transformers  # noqa: F401
        import trl  # noqa: F401
        self.result["timings_s"]["import_libraries"] = round(time.perf_counter() - t0, 3)
        self.progress(f"transformers {transformers.__version__} and trl {trl.__version__} imported "
                      f"in {time.perf_counter() - t0:.1f}s")

        self._stage("model_build")
        t0 = time.perf_counter()
        model, tokenizer, peft_config = self._build_model()
        self.result["timings_s"]["model_build"] = round(time.perf_counter() - t0, 3)

        self._stage("trainer_init")
        t0 = time.perf_counter()
        trainer = self._build_trainer(model, tokenizer, peft_config)
        del model
        self.trainer = trainer
        self.result["timings_s"]["trainer_init"] = round(time.perf_counter() - t0, 3)
        self._measure_persistent_parts(trainer)
        self.progress(f"trainer ready in {time.perf_counter() - t0:.1f}s")

        self._stage("training")
        self._install_hooks(trainer)
        t0 = time.perf_counter()
        self.tracker.start()
        for sampler in self.tracker.samplers:
            sampler.start()
        trainer.train()
        self.result["timings_s"]["train"] = round(time.perf_counter() - t0, 3)
        self.result["status"] = "ok"
        self._stage("done")
        self.progress(f"done: {self.result['steps_completed']} steps in {time.perf_counter() - t0:.1f}s")

    # -- device ----------------------------------------------------------------------------------------
    def _take_nvml_baseline(self) -> None:
        """NVML's view of the device before this process creates a CUDA context: the baseline for this
        process's own usage when NVML cannot see its PID, and for other processes' memory."""
        handle, how, reason = nvml_handle(0)
        if handle is None:
            self.result["gpu"]["reasons"]["nvml_baseline"] = reason
            return
        info, reason = nvml_memory(handle)
        if info is None:
            self.result["gpu"]["reasons"]["nvml_baseline"] = reason
            return
        self.nvml_baseline = {**info, "device_match": how}
        self.result["gpu"]["nvml_baseline"] = self.nvml_baseline

    def _choose_device(self) -> None:
        torch = self.torch
        requested = self.request.get("device", "auto")
        available = torch.cuda.is_available()
        if requested == "cuda" and not available:
            raise _Skip(no_cuda_reason(torch))
        self.cuda = available if requested == "auto" else requested == "cuda"
        device = self.result["device"]
        device["type"] = "cuda" if self.cuda else "cpu"
        device["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        if not self.cuda:
            reason = no_cuda_reason(torch) if not available else "not measured: the run was asked for the CPU"
            self.gpu_reason = f"not measured: {reason}" if not reason.startswith("not measured") else reason
            self.progress("device: cpu (GPU fields not measured)")
            return
        torch.cuda.set_device(0)
        torch.cuda.init()
        torch.empty(1, device="cuda")  # create the context now, so it is not charged to a phase
        properties = torch.cuda.get_device_properties(0)
        device.update(index=0, name=properties.name, total_bytes=int(properties.total_memory),
                      capability=f"{properties.major}.{properties.minor}")
        if self.setup.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise _Skip(f"{properties.name} does not support bfloat16 (compute capability "
                        f"{properties.major}.{properties.minor})")
        baseline_used = self.nvml_baseline["used"] if self.nvml_baseline else None
        snapshot = MemorySnapshot(0, use_torch=True, baseline_nvml_used_bytes=baseline_used)
        self.snapshots = {"after_cuda_init": snapshot.to_dict()}
        if snapshot.process_used_bytes is not None:
            self.result["gpu"]["cuda_context_bytes"] = snapshot.process_used_bytes
            self.result["gpu"]["cuda_context_source"] = snapshot.process_used_source
        else:
            self.result["gpu"]["reasons"]["cuda_context_bytes"] = snapshot.reason("process_used_bytes")
        self.progress(f"device: cuda:0 {properties.name} ({format_gib(properties.total_memory)}), "
                      f"context {format_gib(snapshot.cuda_used_bytes or 0)} used on the device")

    def _check_backend(self) -> None:
        setup = self.setup
        if setup.backend == "unsloth" and importlib.util.find_spec("unsloth") is None:
            raise _Skip("unsloth not installed")
        if setup.use_vllm:
            if setup.vllm_mode == "server":
                raise _Skip("vllm_mode='server' runs vLLM on other GPUs; a run measures one process")
            if importlib.util.find_spec("vllm") is None:
                raise _Skip("vllm not installed")
            if not self.cuda:
                raise _Skip("vLLM colocate needs a CUDA device")

    # -- model -----------------------------------------------------------------------------------------
    def _device(self) -> str:
        return "cuda:0" if self.cuda else "cpu"

    def _needs_model_dir(self) -> bool:
        setup = self.setup
        return (setup.use_vllm or setup.load_in_4bit or setup.backend == "unsloth"
                or (setup.beta != 0 and not setup.is_lora))

    def _build_model(self):
        from . import tiny

        setup, torch = self.setup, self.torch
        source = tiny.model_source(setup.model)
        self.result["model"] = {"source": source["kind"], "name": source["spec"], "path": source.get("path")}
        work_dir = Path(self.request["work_dir"])
        model_dir: Path | None = None
        tokenizer = None
        if source["kind"] == "local-weights":
            model_dir = Path(source["path"])
            tokenizer = self._user_tokenizer(model_dir)
            if tokenizer is None:
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(model_dir)
                tokenizer = tiny.build_tokenizer(config.get_text_config().vocab_size)
                self.own_tokenizer = True
                if self._needs_model_dir():
                    model_dir = self._overlay_dir(model_dir, tokenizer, work_dir / "model")
            self.progress(f"loading {model_dir} (local weights)")
        else:
            config = tiny.build_config(source["config"])
            vocab_size = config.get_text_config().vocab_size
            tokenizer = tiny.build_tokenizer(vocab_size)
            self.own_tokenizer = True
            if self._needs_model_dir():
                # vLLM, bitsandbytes, Unsloth and TRL's reference model load from a directory
                save_dtype = "bfloat16" if setup.dtype == "float32" else setup.dtype
                self.progress(f"building {source['spec']} with random weights ({save_dtype}) to save it for loading")
                model = tiny.build_model(config, dtype=save_dtype, device=self._device(),
                                         attn_implementation=setup.attn_implementation)
                model_dir = tiny.save_model_dir(model, tokenizer, work_dir / "model")
                del model
                self._free()
            else:
                self.progress(f"building {source['spec']} with random weights ({setup.dtype}) on {self._device()}")
                model = tiny.build_model(config, dtype=setup.dtype, device=self._device(),
                                         attn_implementation=setup.attn_implementation)
                return self._model_ready(model, tokenizer)
        if setup.backend == "unsloth":
            return self._load_unsloth(model_dir)
        return self._model_ready(self._load_pretrained(model_dir), tokenizer)

    def _user_tokenizer(self, model_dir: Path):
        if not any((model_dir / name).exists() for name in ("tokenizer.json", "tokenizer_config.json",
                                                            "tokenizer.model")):
            return None
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left", truncation_side="left")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def _overlay_dir(self, source: Path, tokenizer, target: Path) -> Path:
        """The user's weights (symlinked, never copied or modified) plus our tokenizer, for loaders that read
        both from one directory."""
        target.mkdir(parents=True, exist_ok=True)
        for item in source.iterdir():
            (target / item.name).symlink_to(item.resolve())
        tokenizer.save_pretrained(target)
        return target

    def _load_pretrained(self, model_dir: Path):
        from transformers import AutoModelForCausalLM

        from .tiny import torch_dtype

        setup = self.setup
        kwargs: dict[str, Any] = {"dtype": torch_dtype(setup.dtype), "attn_implementation": setup.attn_implementation}
        if setup.load_in_4bit:
            if not self.cuda:
                raise _Skip("load_in_4bit needs a CUDA device (bitsandbytes)")
            if importlib.util.find_spec("bitsandbytes") is None:
                raise _Skip("bitsandbytes not installed (needed for load_in_4bit)")
            from transformers import BitsAndBytesConfig

            # TRL's QLoRA recipe: NF4, bf16 compute, no double quantisation (what the estimate models)
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=self.torch.bfloat16)
        kwargs["device_map"] = {"": 0} if self.cuda else {"": "cpu"}
        self.progress(f"loading weights from {model_dir} ({'4-bit NF4' if setup.load_in_4bit else setup.dtype})")
        return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)

    def _load_unsloth(self, model_dir: Path):
        from unsloth import FastLanguageModel

        setup = self.setup
        if not self.cuda:
            raise _Skip("Unsloth needs a CUDA device")
        self.progress(f"loading with Unsloth FastLanguageModel (fast_inference={setup.use_vllm}, "
                      f"load_in_4bit={setup.load_in_4bit})")
        from .tiny import torch_dtype

        kwargs = dict(model_name=str(model_dir), max_seq_length=setup.max_prompt_length + setup.max_completion_length,
                      load_in_4bit=setup.load_in_4bit, fast_inference=setup.use_vllm,
                      max_lora_rank=setup.lora_rank or 16,
                      dtype=None if setup.load_in_4bit else torch_dtype(setup.dtype))
        if setup.use_vllm:
            kwargs["gpu_memory_utilization"] = setup.vllm_gpu_memory_utilization
        before = self.torch.cuda.memory_allocated(0)
        model, tokenizer = FastLanguageModel.from_pretrained(**kwargs)
        self.result["gpu"]["unsloth_load_allocated_bytes"] = int(self.torch.cuda.memory_allocated(0) - before)
        if setup.is_lora:
            targets = list(setup.resolve_target_modules())
            checkpointing = setup.gradient_checkpointing
            model = FastLanguageModel.get_peft_model(
                model, r=setup.lora_rank, target_modules=targets, lora_alpha=setup.lora_rank,
                use_gradient_checkpointing="unsloth" if checkpointing == "unsloth" else bool(checkpointing),
                random_state=0)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        return self._model_ready(model, tokenizer, peft_done=True)

    def _model_ready(self, model, tokenizer, peft_done: bool = False):
        from .tiny import count_parameter_bytes

        num_params, param_bytes = count_parameter_bytes(model)
        self.result["model"].update(num_params=int(num_params), parameter_bytes=int(param_bytes),
                                    dtype=str(next(model.parameters()).dtype).replace("torch.", ""))
        if self.cuda:
            self.result["gpu"]["weights_allocated_bytes"] = int(self.torch.cuda.memory_allocated(0))
            self.snapshots["after_model"] = self._snapshot().to_dict()
        self.progress(f"model ready: {num_params / 1e6:.1f}M params, {format_gib(param_bytes)} of weights"
                      + (f", {format_gib(self.torch.cuda.memory_allocated(0))} allocated on the GPU"
                         if self.cuda else ""))
        peft_config = None
        setup = self.setup
        if setup.is_lora and not peft_done:
            from peft import LoraConfig

            peft_config = LoraConfig(r=setup.lora_rank, lora_alpha=2 * setup.lora_rank, lora_dropout=0.0,
                                     target_modules=list(setup.resolve_target_modules()), task_type="CAUSAL_LM")
        self.tokenizer = tokenizer
        return model, tokenizer, peft_config

    def _snapshot(self) -> MemorySnapshot:
        baseline = self.nvml_baseline["used"] if self.nvml_baseline else None
        return MemorySnapshot(0, use_torch=self.cuda, baseline_nvml_used_bytes=baseline)

    def _free(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    # -- trainer ---------------------------------------------------------------------------------------
    def _grpo_config(self, output_dir: Path):
        import dataclasses

        from trl import GRPOConfig

        setup = self.setup
        completion = setup.max_completion_length
        if setup.use_vllm:
            generation_kwargs = {"min_tokens": completion}  # vLLM SamplingParams: no EOS before C tokens
        else:
            generation_kwargs = {"min_new_tokens": completion}  # transformers GenerationConfig
        kwargs: dict[str, Any] = dict(
            output_dir=str(output_dir), max_steps=int(self.request.get("steps", 2)), report_to="none",
            save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, dataloader_num_workers=0,
            learning_rate=1e-6, log_completions=False,
            per_device_train_batch_size=setup.per_device_train_batch_size,
            gradient_accumulation_steps=setup.gradient_accumulation_steps,
            steps_per_generation=setup.steps_per_generation, num_iterations=setup.num_iterations,
            num_generations=setup.num_generations, max_completion_length=completion,
            max_prompt_length=setup.max_prompt_length,  # only TRL < 0.28 has it; dropped below otherwise
            gradient_checkpointing=bool(setup.gradient_checkpointing), optim=setup.optim, beta=setup.beta,
            use_vllm=setup.use_vllm, vllm_mode=setup.vllm_mode,
            vllm_gpu_memory_utilization=setup.vllm_gpu_memory_utilization,
            vllm_enable_sleep_mode=setup.vllm_enable_sleep_mode,
            vllm_importance_sampling_correction=setup.vllm_importance_sampling_correction,
            vllm_max_model_length=setup.max_prompt_length + completion,
            use_liger_kernel=setup.use_liger_kernel, cast_lm_head_to_fp32=setup.cast_lm_head_to_fp32,
            generation_kwargs=generation_kwargs,
        )
        if self.cuda:
            kwargs.update(bf16=setup.dtype != "float16", fp16=setup.dtype == "float16")
        else:
            kwargs.update(use_cpu=True, bf16=False, fp16=False)
        known = {f.name for f in dataclasses.fields(GRPOConfig)}
        dropped = sorted(k for k in kwargs if k not in known)
        for name in dropped:
            value = kwargs.pop(name)
            if name == "max_prompt_length":
                continue  # prompts are built at exactly max_prompt_length tokens anyway
            if value not in (None, False):
                self.note(f"GRPOConfig of this trl has no {name!r}: {name}={value!r} not applied")
        return GRPOConfig(**kwargs)

    def _dataset(self):
        from datasets import Dataset

        from .tiny import make_prompts

        setup = self.setup
        steps = int(self.request.get("steps", 2))
        rows = setup.per_device_train_batch_size * max(setup.gradient_accumulation_steps, setup.steps_per_generation)
        num_prompts = max(16, (rows * steps * 2) // setup.num_generations + 8)
        vocab_size = len(self.tokenizer)
        if self.own_tokenizer:
            prompts = make_prompts(num_prompts, setup.max_prompt_length, vocab_size)
        else:  # a user's tokenizer: plain words, cut/extended to exact length by the _tokenize_prompts hook
            words = "the quick brown fox jumps over the lazy dog".split()
            prompts = [" ".join(words[(i + j) % len(words)] for j in range(setup.max_prompt_length))
                       for i in range(num_prompts)]
        return Dataset.from_dict({"prompt": prompts})

    def _build_trainer(self, model, tokenizer, peft_config):
        from trl import GRPOTrainer

        setup = self.setup
        args = self._grpo_config(Path(self.request["work_dir"]) / "trainer")
        callback = self._callback()
        if setup.use_vllm and setup.backend == "trl":
            self._watch_vllm_init()
            self.progress(f"starting vLLM colocate (gpu_memory_utilization={setup.vllm_gpu_memory_utilization}, "
                          f"sleep mode {'on' if setup.vllm_enable_sleep_mode else 'off'})")
        before = self.torch.cuda.memory_allocated(0) if self.cuda else None
        trainer = GRPOTrainer(model=model, reward_funcs=_length_reward, args=args, train_dataset=self._dataset(),
                              processing_class=tokenizer, peft_config=peft_config, callbacks=[callback])
        if self.cuda:
            self.result["gpu"]["trainer_init_allocated_delta_bytes"] = int(self.torch.cuda.memory_allocated(0) - before)
            self.snapshots["after_trainer_init"] = self._snapshot().to_dict()
        return trainer

    def _watch_vllm_init(self) -> None:
        """Measure vLLM's start-up (TRL's ``VLLMGeneration.__init__``, trl/generation/vllm_generation.py)."""
        try:
            from trl.generation.vllm_generation import VLLMGeneration
        except ImportError as exc:
            self.note(f"vLLM start-up not measured separately: {exc}")
            return
        original = VLLMGeneration.__init__
        child = self

        def init(self_, *args, **kwargs):
            torch = child.torch
            allocated, reserved = torch.cuda.memory_allocated(0), torch.cuda.memory_reserved(0)
            free, _total = torch.cuda.mem_get_info(0)
            started = time.perf_counter()
            original(self_, *args, **kwargs)
            free_after, _ = torch.cuda.mem_get_info(0)
            child.result["gpu"]["vllm_init"] = {
                "allocated_delta_bytes": int(torch.cuda.memory_allocated(0) - allocated),
                "reserved_delta_bytes": int(torch.cuda.memory_reserved(0) - reserved),
                "device_used_delta_bytes": int(free - free_after),
                "sleep_mode": bool(child.setup.vllm_enable_sleep_mode),
                "seconds": round(time.perf_counter() - started, 3)}
            child.progress(f"vLLM started in {time.perf_counter() - started:.1f}s, "
                           f"{format_gib(free - free_after)} of device memory")

        VLLMGeneration.__init__ = init

    def _measure_persistent_parts(self, trainer) -> None:
        """Exact tensor bytes of what lives for the whole run: policy weights, LoRA adapters, reference model."""
        model = trainer.model
        lora, weights = [], []
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            (lora if "lora_" in name else weights).append(tensor)
        parts = {"weights_bytes": _tensor_bytes(weights), "lora_bytes": _tensor_bytes(lora)}
        ref = getattr(trainer, "ref_model", None)
        parts["reference_bytes"] = _tensor_bytes(list(ref.parameters()) + list(ref.buffers())) if ref is not None else 0
        if self.cuda:
            on_device = [t for t in weights if t.device.type == "cuda"]
            parts["weights_bytes"] = _tensor_bytes(on_device)
        self.result["gpu" if self.cuda else "host_memory"]["persistent_tensors"] = parts
        self.persistent_parts = parts

    # -- hooks -----------------------------------------------------------------------------------------
    def _context(self) -> dict[str, Any]:
        trainer = self.trainer
        if trainer is None:
            return {}
        return {"optimizer_state_bytes": optimizer_state_bytes(getattr(trainer, "optimizer", None)),
                "gradient_bytes": gradient_bytes(trainer.model)}

    def _install_hooks(self, trainer) -> None:
        samplers = []
        if self.cuda:
            nvml_sampler = NvmlSampler(0, uuid=torch_device_uuid(self.torch, 0))
            if not nvml_sampler.available:  # e.g. a MIG UUID this driver cannot look up: match by index
                nvml_sampler = NvmlSampler(0)
            if nvml_sampler.available:
                samplers.append(nvml_sampler)
            else:
                self.result["gpu"]["reasons"]["nvml_peak_bytes"] = nvml_sampler.reason
        rss = RssSampler()
        if rss.available:
            samplers.append(rss)
        else:
            self.result["host_memory"]["reason"] = rss.reason
        self.tracker = PhaseTracker(self.torch if self.cuda else None, 0, tuple(samplers), context=self._context)
        wraps = {"training_step": Phase.TRAINING.value, "_generate_and_score_completions": Phase.SCORING.value,
                 "_generate": Phase.GENERATION.value}
        for method, phase in wraps.items():
            if hasattr(trainer, method):
                setattr(trainer, method, self._wrap(getattr(trainer, method), phase))
            else:
                self.note(f"trainer has no {method}: the {phase} phase is not separated by it")
        if hasattr(trainer, "_clip_grad_norm"):
            trainer._clip_grad_norm = self._wrap_clip(trainer._clip_grad_norm)
        for method in ("_tokenize_prompts", "_generate_single_turn"):
            if hasattr(trainer, method):
                setattr(trainer, method, getattr(self, f"_hook{method}")(getattr(trainer, method)))

    def _wrap(self, function, phase: str):
        tracker = self.tracker
        child = self

        def wrapped(*args, **kwargs):
            with tracker.phase(phase):
                child._maybe_fault(phase)
                return function(*args, **kwargs)

        wrapped.__wrapped__ = function
        return wrapped

    def _wrap_clip(self, function):
        """Gradient clipping opens the optimizer-step phase (transformers calls it just before
        ``on_pre_optimizer_step``); ``on_optimizer_step`` closes it, so one step is one occurrence."""
        tracker = self.tracker

        def wrapped(*args, **kwargs):
            if tracker.current != Phase.OPTIMIZER.value:
                tracker.enter(Phase.OPTIMIZER.value)
            return function(*args, **kwargs)

        wrapped.__wrapped__ = function
        return wrapped

    def _maybe_fault(self, phase: str) -> None:
        if self._fault_fired or self.fault is None:
            return
        if self.fault == "oom-in-generation" and phase == Phase.GENERATION.value:
            self._fault_fired = True
            oom_type = getattr(self.torch, "OutOfMemoryError", None) or self.torch.cuda.OutOfMemoryError
            raise oom_type(self.request.get("fault_message") or "CUDA out of memory. Tried to allocate 2.00 GiB")

    def _hook_tokenize_prompts(self, function):
        """Prompts of exactly max_prompt_length tokens, whatever the tokenizer (TRL ≥ 0.28 does not truncate)."""
        from .tiny import exact_length_ids

        length = self.setup.max_prompt_length
        filler = self.tokenizer.pad_token_id or 0
        child = self

        def wrapped(*args, **kwargs):
            result = function(*args, **kwargs)
            if isinstance(result, tuple) and result and isinstance(result[0], list):
                ids = result[0]
                if any(len(row) != length for row in ids):
                    child.result["tokens"]["prompt_length_forced"] = True
                    ids = [exact_length_ids(list(row), length, filler) for row in ids]
                    result = (ids, *result[1:])
            return result

        return wrapped

    def _hook_generate_single_turn(self, function):
        tokens = self.result["tokens"]

        def wrapped(prompt_ids, *args, **kwargs):
            output = function(prompt_ids, *args, **kwargs)
            completion_ids = output[0] if isinstance(output, tuple) else None
            prompt_lengths = [len(row) for row in prompt_ids]
            tokens["prompt_min"] = min(prompt_lengths + [tokens.get("prompt_min", 10**9)])
            tokens["prompt_max"] = max(prompt_lengths + [tokens.get("prompt_max", 0)])
            tokens["prompts_generated"] = tokens.get("prompts_generated", 0) + len(prompt_ids)
            if completion_ids is not None:
                lengths = [len(row) for row in completion_ids]
                tokens["completion_min"] = min(lengths + [tokens.get("completion_min", 10**9)])
                tokens["completion_max"] = max(lengths + [tokens.get("completion_max", 0)])
                tokens["completions_generated"] = tokens.get("completions_generated", 0) + len(lengths)
            return output

        return wrapped

    def _callback(self):
        from transformers import TrainerCallback

        child = self

        class PhaseCallback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                child.step_started = time.perf_counter()
                if child.tracker is not None:
                    child.tracker.step = state.global_step + 1

            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                if child.tracker is not None and child.tracker.current != Phase.OPTIMIZER.value:
                    child.tracker.enter(Phase.OPTIMIZER.value)

            def on_optimizer_step(self, args, state, control, **kwargs):
                if child.tracker is not None:
                    child.tracker.exit(Phase.OPTIMIZER.value)

            def on_step_end(self, args, state, control, **kwargs):
                child._on_step_end(state)

        return PhaseCallback()

    def _on_step_end(self, state) -> None:
        seconds = time.perf_counter() - (self.step_started or self.started)
        self.result["steps_completed"] = int(state.global_step)
        self.result["timings_s"].setdefault("steps", []).append(round(seconds, 3))
        detail = ""
        if self.cuda:
            torch = self.torch
            free, total = torch.cuda.mem_get_info(0)
            reserved = int(torch.cuda.memory_reserved(0))
            # between steps: grads freed by zero_grad(set_to_none=True), optimizer states live
            self.result["gpu"]["persistent_sample"] = {
                "step": int(state.global_step), "allocated_bytes": int(torch.cuda.memory_allocated(0)),
                "reserved_bytes": reserved, "non_torch_bytes": int(total - free) - reserved,
                "context": self._context()}
            peak = self.tracker.overall_peak_reserved_bytes if self.tracker else None
            if peak is not None:
                detail = f", peak reserved so far {format_gib(max(peak, torch.cuda.max_memory_reserved(0)))}"
        self.progress(f"step {state.global_step}/{self.result['steps_requested']} done in {seconds:.1f}s{detail}")

    # -- failures --------------------------------------------------------------------------------------
    def _failed_phase(self) -> str:
        if self.tracker is not None and self.tracker.failed_phase is not None:
            phase = self.tracker.failed_phase
            return "between_phases" if phase == PhaseTracker.OUTSIDE else phase
        return "setup"

    def _record_oom(self, exc: BaseException) -> None:
        message = str(exc)
        parsed, parse_reason = parse_oom_text(message)
        oom = {"phase": self._failed_phase(), "stage": self.result["stage"], "type": type(exc).__name__,
               "message": message[-4000:], "parsed": parsed, "parse_reason": parse_reason}
        if self.cuda:
            snapshot = self._snapshot()  # before anything is freed: what was held at the failure
            oom["snapshot"] = snapshot.to_dict()
        self.result["status"], self.result["oom"] = "oom", oom
        self.result["reason"] = f"out of memory in the {oom['phase']} phase: {message.splitlines()[0][:300]}"
        self.progress(self.result["reason"])
        exc.__traceback__ = None  # frames hold tensors (anchors.md: clear them after an OOM)

    def _record_crash(self, exc: BaseException) -> None:
        lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
        self.result["status"] = "crashed"
        self.result["reason"] = f"{type(exc).__name__} in stage {self.result['stage']}: {str(exc)[:500]}"
        self.result["exception"] = {"type": type(exc).__name__, "message": str(exc)[:4000],
                                    "phase": self._failed_phase() if self.tracker else None,
                                    "traceback_tail": "".join(lines)[-6000:]}
        self.progress(self.result["reason"])

    # -- results ---------------------------------------------------------------------------------------
    def _finish_measurements(self) -> None:
        from ..runner import measured_breakdown

        gpu = self.result["gpu"]
        tracker = self.tracker
        if tracker is not None:
            for sampler in tracker.samplers:
                sampler.stop()
            tracker.finish()
            self.result["phases"] = tracker.to_dict()
            for sampler in tracker.samplers:
                key = "nvml_sampler" if sampler.name == "nvml" else "rss_sampler"
                (gpu if sampler.name == "nvml" else self.result["host_memory"])[key] = sampler.to_dict(max_points=200)
        # getrusage's high-water mark is updated lazily by Linux: the sampler can have seen more
        peaks = [MemorySnapshot(use_torch=False).host_peak_rss_bytes]
        if tracker is not None:
            peaks += [s.peak_bytes for s in tracker.samplers if s.name == "rss"]
        self.result["host_memory"]["peak_rss_bytes"] = max((p for p in peaks if p is not None), default=None)
        if self.snapshots:
            gpu["snapshots"] = self.snapshots
        if not self.cuda:
            reason = self.gpu_reason or "not measured: the run did not reach the device check"
            for name in ("peak_reserved_bytes", "peak_allocated_bytes", "nvml_peak_bytes", "non_torch_bytes"):
                gpu[name] = None
                gpu["reasons"][name] = reason
            self.result["breakdown"] = None
            gpu["reasons"]["breakdown"] = reason
            return
        if tracker is not None:
            gpu["peak_reserved_bytes"] = tracker.overall_peak_reserved_bytes
            gpu["peak_allocated_bytes"] = tracker.overall_peak_allocated_bytes
            gpu["non_torch_bytes"] = tracker.overall_non_torch_bytes
            nvml_sampler = next((s for s in tracker.samplers if s.name == "nvml"), None)
            gpu["nvml_peak_bytes"] = nvml_sampler.peak_bytes if nvml_sampler else None
            if nvml_sampler is None:
                gpu["reasons"].setdefault("nvml_peak_bytes", "NVML sampler not running")
        else:
            for name in ("peak_reserved_bytes", "peak_allocated_bytes", "nvml_peak_bytes", "non_torch_bytes"):
                gpu[name] = None
                gpu["reasons"][name] = f"not measured: the run stopped in stage {self.result['stage']}"
        if self.nvml_baseline is not None and self.nvml_baseline.get("api") == "v2":
            gpu["other_processes_bytes_at_start"] = int(self.nvml_baseline["used"])
        try:
            breakdown, notes = measured_breakdown(self.result)
        except Exception as exc:  # noqa: BLE001 - the raw figures are still worth returning
            breakdown, notes = None, [f"breakdown failed: {type(exc).__name__}: {exc}"]
        self.result["breakdown"] = breakdown.to_dict() if breakdown is not None else None
        self.result["notes"].extend(notes)


def _length_reward(completions, **kwargs) -> list[float]:
    """A reward that varies between completions (so advantages are not all zero); its value is irrelevant."""
    return [float(len(str(completion)) % 17) for completion in completions]


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m pytest_gpumem.measure.child REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    request_path, result_path = Path(argv[0]), Path(argv[1])
    request = json.loads(request_path.read_text(encoding="utf-8"))
    result = Child(request).execute()
    _write_json(result_path, result)
    # skip interpreter teardown of CUDA/vLLM state: the result is written, a slow or crashing exit is noise
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
