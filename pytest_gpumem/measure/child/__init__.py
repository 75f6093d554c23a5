"""The measurement child process (``python -m pytest_gpumem.measure.child``): it never imports the parent's runner."""
