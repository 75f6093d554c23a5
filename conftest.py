"""Root conftest: serves the project's own tests (pytester is enabled in pyproject's addopts)."""
