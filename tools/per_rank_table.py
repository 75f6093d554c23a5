"""Print the docs table of per-rank predictions (docs/distributed.md §8): 7B / 14B / 32B GRPO on 8 × 80 GB with
ZeRO-3 and FSDP2, full fine-tuning and LoRA, HF generate and colocated vLLM.

Usage: ``python tools/per_rank_table.py [--write-docs]`` (pure arithmetic: the analytic estimate, < 1 s);
``--write-docs`` replaces the table in docs/distributed.md. tests/test_docs_tables.py requires the docs to hold
exactly this output, so the table cannot drift from the code.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from pytest_gpumem import estimate
from pytest_gpumem.units import format_gib

MODELS = ("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-14B", "Qwen/Qwen2.5-32B")
STRATEGIES = ("zero3", "fsdp2")
GPU = "A100-80GB"
#: TRL's GRPOConfig defaults (b = 8, G = 8, 512 + 512 tokens, checkpointing on) with bf16 weights, 8 GPUs
COMMON = {"dtype": "bfloat16", "per_device_train_batch_size": 8, "world_size": 8}


def rows() -> list[list[str]]:
    out = []
    for model in MODELS:
        for training, extra in (("full", {}), ("LoRA r=16", {"lora_rank": 16, "lora_target_modules": "all-linear"})):
            for strategy in STRATEGIES:
                for generation, gen in (("HF generate", {}), ("vLLM colocate 0.3", {"use_vllm": True})):
                    result = estimate({"model": model, **COMMON, **extra, "distributed": strategy, **gen}, gpu=GPU)
                    breakdown = result.breakdown
                    worst = breakdown.role(breakdown.worst_role)
                    top = ", ".join(f"{name} {format_gib(num)}" for name, num in worst.top_components(n=3))
                    refuses = any(w.startswith("vLLM would refuse") for w in result.warnings)
                    verdict = ("yes" if result.fits() else "**no**: vLLM cannot start (its weights exceed 0.3 × card)"
                               if refuses else "**no**")
                    out.append([model.split("/")[-1], training, strategy, generation, format_gib(result.peak_bytes),
                                str(result.peak_phase), top, verdict])
    return out


def table() -> str:
    header = ["model", "training", "strategy", "generation", "per-GPU peak", "phase", "largest components",
              "fits 80 GB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows()]
    return "\n".join(lines)


DOCS = Path(__file__).resolve().parents[1] / "docs" / "distributed.md"


def write_docs(path: Path = DOCS) -> None:
    text = path.read_text(encoding="utf-8")
    new = re.sub(r"(<!-- per-rank-table:start -->\n).*?(\n<!-- per-rank-table:end -->)",
                 lambda m: m.group(1) + table() + m.group(2), text, flags=re.S)
    path.write_text(new, encoding="utf-8")


if __name__ == "__main__":
    if "--write-docs" in sys.argv[1:]:
        write_docs()
    else:
        print(table())
