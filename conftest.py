"""Root conftest: serves the project's own tests (pytester is enabled in pyproject's addopts).

Nothing here may reach for the Hugging Face hub: models are built from configs, tokenizers locally.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
