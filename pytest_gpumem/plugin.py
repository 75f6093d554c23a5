"""pytest-gpumem plugin (placeholder while the plugin is being written: registers the marker only)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu_budget(gb=..., setup=...): GPU memory budget of a GRPO setup")
