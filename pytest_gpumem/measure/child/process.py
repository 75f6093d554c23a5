"""The measured run of one request: device, model, trainer, ``trainer.train()`` — the orchestration; the hooks
that measure (``hooks.py``), what is written (``results.py``) and each backend's loader (``backends/``) are
apart. Started as ``python -m pytest_gpumem.measure.child`` by ``measure.runner``, whose code it never imports:
the wire is ``measure.protocol``.

The model is built locally with random weights (``tiny.py``) unless the setup points at a directory with
weights; an OOM is caught and written as a structured result; anything else that goes wrong is written as
``status: "crashed"`` with the traceback's tail. Progress lines go to stderr.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ...spec import GRPOSetup
from ...units import format_gib
from ..nvml import nvml_handle, nvml_memory
from ..protocol import RESULT_SCHEMA, progress_line
from ..sampler import PhaseTracker
from ..snapshot import MemorySnapshot, no_cuda_reason
from . import distributed, hooks, results, tiny
from .backends import TRAINER_BACKENDS
from .results import Skip, is_oom


class Child:
    """One measured run: the request, what it has measured so far (``result``), and the live objects."""

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
        self.rank = distributed.rank_of(request)
        if request.get("fault_rank") is not None and self.rank != request["fault_rank"]:
            self.fault = None  # the fault is for another rank
        if self.rank is not None:
            self.result["rank_info"] = {"rank": self.rank, "world_size": int(request["world_size"]),
                                   "distributed": request.get("distributed")}
        self.fault_fired = False
        self.step_started: float | None = None
        self.snapshots: dict[str, Any] = {}
        self.own_tokenizer = False
        self.gpu_reason: str | None = None
        self.setup = None

    # -- output --------------------------------------------------------------------------------------
    def progress(self, message: str) -> None:
        if self.rank is not None:
            message = f"[rank {self.rank}] {message}"
        # one write per line: several ranks share the launcher's pipe, and print() writes the newline apart
        sys.stderr.write(progress_line(time.perf_counter() - self.started, message, self.result["stage"]) + "\n")
        sys.stderr.flush()

    def note(self, text: str) -> None:
        self.result["notes"].append(text)

    # -- the run -------------------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        self.progress(f"child started (pid {os.getpid()}, python {platform.python_version()})")
        self._early_faults()
        try:
            self._run()
        except Skip as skip:
            self.result["status"], self.result["reason"] = "skipped", str(skip)
            self.gpu_reason = self.gpu_reason or f"not measured: {skip}"
            self.progress(f"skipped: {skip}")
        except BaseException as exc:  # noqa: BLE001 - reported, never propagated
            if self.tracker is not None:
                self.tracker.note_failure()
            if is_oom(exc, self.torch):
                results.record_oom(self, exc)
            else:
                results.record_crash(self, exc)
        finally:
            self.result["timings_s"]["total"] = round(time.perf_counter() - self.started, 3)
            results.finish_measurements(self)
            self.result["versions"] = results.versions()
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
        backend = TRAINER_BACKENDS[setup.backend]

        t0 = time.perf_counter()
        if setup.unsloth_vllm_standby:
            # read from the environment when unsloth is imported (unsloth_zoo vllm_utils.py, load_vllm)
            os.environ["UNSLOTH_VLLM_STANDBY"] = "1"
        backend.import_first()
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
        fake_world = self.request.get("fake_world_size")
        if fake_world:
            # one process measured as rank 0 of an N-GPU FSDP2 job (measure.launch.run_rank0)
            self.rank = 0
            self.result["rank_info"] = {"rank": 0, "world_size": int(fake_world), "distributed": "fsdp2",
                                        "fake_process_group": True}
            distributed.join_fake_group(int(fake_world), "cuda" if self.cuda else "cpu")
            self.note(f"rank 0 of {fake_world} under a fake process group: collectives move no data, their "
                      "buffers are allocated as in the real job")
        elif self.rank is not None and self.request.get("distributed") == "fsdp2" and not self.cuda:
            distributed.promote_cpu_fsdp()
            self.note("CPU/gloo launch: accelerate's MULTI_CPU promoted to FSDP (it ignores FSDP on CPU otherwise)")
        trainer = self._build_trainer(model, tokenizer, peft_config)
        del model
        self.trainer = trainer
        self.result["timings_s"]["trainer_init"] = round(time.perf_counter() - t0, 3)
        results.measure_persistent_parts(self, trainer)
        self.progress(f"trainer ready in {time.perf_counter() - t0:.1f}s")

        self._stage("training")
        hooks.install_hooks(self, trainer)
        t0 = time.perf_counter()
        self.tracker.start()
        for sampler in self.tracker.samplers:
            sampler.start()
        trainer.train()
        self.result["timings_s"]["train"] = round(time.perf_counter() - t0, 3)
        if self.rank is not None:  # after train(): the Trainer wraps (shards) the model when training starts
            self.result["rank_info"].update(distributed.describe_rank(trainer))
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
            raise Skip(no_cuda_reason(torch))
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
            raise Skip(f"{properties.name} does not support bfloat16 (compute capability "
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
        TRAINER_BACKENDS[setup.backend].check(self)
        if setup.use_vllm:
            if setup.vllm_mode == "server":
                raise Skip("vllm_mode='server' runs vLLM on other GPUs; a run measures one process")
            if importlib.util.find_spec("vllm") is None:
                raise Skip("vllm not installed")
            if not self.cuda:
                raise Skip("vLLM colocate needs a CUDA device")

    # -- model -----------------------------------------------------------------------------------------
    def _device(self) -> str:
        return "cuda:0" if self.cuda else "cpu"

    def _needs_model_dir(self) -> bool:
        setup = self.setup
        return (setup.use_vllm or setup.load_in_4bit or TRAINER_BACKENDS[setup.backend].needs_model_dir
                or (setup.beta != 0 and not setup.is_lora))

    def _build_model(self):
        setup = self.setup
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
                return self.model_ready(model, tokenizer)
        return TRAINER_BACKENDS[setup.backend].load(self, model_dir, tokenizer)

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

    def model_ready(self, model, tokenizer, peft_done: bool = False):
        """Record the model's size, keep the tokenizer, and make the LoRA config the trainer applies (unless the
        backend's loader applied its own)."""
        num_params, param_bytes = tiny.count_parameter_bytes(model)
        self.result["model"].update(num_params=int(num_params), parameter_bytes=int(param_bytes),
                                    dtype=str(next(model.parameters()).dtype).replace("torch.", ""))
        if self.cuda:
            self.result["gpu"]["weights_allocated_bytes"] = int(self.torch.cuda.memory_allocated(0))
            self.snapshots["after_model"] = self.snapshot().to_dict()
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

    def snapshot(self) -> MemorySnapshot:
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
            # the setup's own mixed-precision flags when given (bf16=False with fp32 weights: pure fp32)
            bf16 = setup.bf16 if setup.bf16 is not None else (setup.dtype != "float16" and not setup.fp16)
            kwargs.update(bf16=bf16, fp16=setup.fp16 if setup.fp16 is not None else setup.dtype == "float16")
        else:
            kwargs.update(use_cpu=True, bf16=False, fp16=False)
        if setup.unsloth_grpo_mini_batch is not None:  # a field of Unsloth's patched GRPOConfig only
            kwargs["unsloth_grpo_mini_batch"] = setup.unsloth_grpo_mini_batch
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

        setup = self.setup
        steps = int(self.request.get("steps", 2))
        rows = setup.per_device_train_batch_size * max(setup.gradient_accumulation_steps, setup.steps_per_generation)
        num_prompts = max(16, (rows * steps * 2) // setup.num_generations + 8)
        vocab_size = len(self.tokenizer)
        if self.own_tokenizer:
            prompts = tiny.make_prompts(num_prompts, setup.max_prompt_length, vocab_size)
        else:  # a user's tokenizer: plain words, cut/extended to exact length by the _tokenize_prompts hook
            words = "the quick brown fox jumps over the lazy dog".split()
            prompts = [" ".join(words[(i + j) % len(words)] for j in range(setup.max_prompt_length))
                       for i in range(num_prompts)]
        return Dataset.from_dict({"prompt": prompts})

    def _build_trainer(self, model, tokenizer, peft_config):
        from trl import GRPOTrainer

        setup = self.setup
        args = self._grpo_config(Path(self.request["work_dir"]) / "trainer")
        callback = hooks.callback(self)
        TRAINER_BACKENDS[setup.backend].before_trainer(self)
        before = self.torch.cuda.memory_allocated(0) if self.cuda else None
        trainer = GRPOTrainer(model=model, reward_funcs=_length_reward, args=args, train_dataset=self._dataset(),
                              processing_class=tokenizer, peft_config=peft_config, callbacks=[callback])
        if self.cuda:
            self.result["gpu"]["trainer_init_allocated_delta_bytes"] = int(self.torch.cuda.memory_allocated(0) - before)
            self.snapshots["after_trainer_init"] = self.snapshot().to_dict()
        return trainer

def _length_reward(completions, **kwargs) -> list[float]:
    """A reward that varies between completions (so advantages are not all zero); its value is irrelevant."""
    return [float(len(str(completion)) % 17) for completion in completions]
