"""Optional: the estimate's ZeRO model states against a real DeepSpeed engine (CPU accelerator, real tensors,
rank 0 of a fake N-rank group, one step), byte for byte. DeepSpeed is not a dependency (nor in CI): it installs
from its sdist with ``DS_BUILD_OPS=0 pip install deepspeed``; without it this test skips, saying so."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_gpumem import estimate

PROBE = Path(__file__).parent / "fixtures" / "deepspeed_engine_probe.py"
#: a tiny Qwen2 whose q/k/v/o projections fall under ZeRO-3's 1e5-element persistence threshold and whose MLP,
#: embedding and head do not, so both rules are exercised
CONFIG = {"model_type": "qwen2", "vocab_size": 2048, "hidden_size": 256, "intermediate_size": 512,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 1024, "tie_word_embeddings": False}
BUCKET = 100_000

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="deepspeed is not installed (optional: DS_BUILD_OPS=0 pip install deepspeed)")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_model_states_match_a_real_engine(stage):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(PROBE), str(stage), "4", str(BUCKET), json.dumps(CONFIG)],
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    real = json.loads(out.stdout.strip().splitlines()[-1])
    predicted = estimate({"model": CONFIG, "dtype": "bfloat16", "world_size": 4, "distributed": f"zero{stage}",
                          "reduce_bucket_size": BUCKET, "per_device_train_batch_size": 2, "num_generations": 2})
    assert predicted.model.num_params == real["params"]
    persistent = predicted.breakdown.role("rank0").components("persistent")
    for name in ("weights", "master_weights", "optimizer_states", "gradients", "reduce_buckets"):
        assert persistent.get(name, 0) == real[name], name
