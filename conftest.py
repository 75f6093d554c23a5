"""Root conftest: serves the project's own tests (pytester is enabled in pyproject's addopts).

Nothing here may reach for the Hugging Face hub: models are built from configs, tokenizers locally.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


#: packages that register process-wide state when first imported (pyarrow extension types, TORCH_LIBRARY
#: namespaces, ...) and so cannot be imported twice in one process
_IMPORT_ONCE = frozenset({"torch", "torchvision", "datasets", "pyarrow", "transformers", "trl", "peft", "accelerate",
                          "safetensors", "tokenizers", "deepspeed", "triton"})


def pytest_configure(config):
    # pytester's in-process runs restore sys.modules afterwards, dropping the modules first imported inside them.
    # Re-importing torch or datasets later in the same worker then fails ("Only a single TORCH_LIBRARY can be used
    # to register the namespace c10d_functional", "Array2DExtensionType already defined"), in whichever test meets
    # it first — order-dependent failures under xdist. Keep those packages across pytester's snapshots (pytester
    # itself keeps zope and readline the same way).
    try:
        from _pytest.pytester import SysModulesSnapshot
    except ImportError:  # a pytest without pytester's snapshot: nothing to keep
        return
    original = SysModulesSnapshot.__init__
    if getattr(original, "_gpumem_keeps_heavy_modules", False):
        return

    def __init__(self, preserve=None):
        def keep(name: str) -> bool:
            return name.split(".", 1)[0] in _IMPORT_ONCE or (preserve is not None and preserve(name))

        original(self, preserve=keep)

    __init__._gpumem_keeps_heavy_modules = True
    SysModulesSnapshot.__init__ = __init__
