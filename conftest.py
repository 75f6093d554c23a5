"""Root conftest: serves the project's own tests (pytester is enabled in pyproject's addopts).

Nothing here may reach for the Hugging Face hub: models are built from configs, tokenizers locally.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_configure(config):
    # pytester's in-process runs drop the modules first imported inside them. datasets (imported by trl when a
    # simulation runs in such a run) registers pyarrow extension types once per process, so importing it again
    # later in the same worker fails with ArrowKeyError ("... Array2DExtensionType already defined"), and which
    # test meets it depends on how xdist shares the tests out. Imported here first, it is never dropped (~1 s,
    # no torch).
    try:
        import datasets  # noqa: F401
    except ImportError:
        pass
