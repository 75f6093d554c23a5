"""Stage 2 of the pipeline: predicting a setup's memory without a GPU.

``predict.analytic`` is the formula (pure Python, microseconds); ``predict.faketensor`` replays the real step
under ``FakeTensorMode`` on CPU. Both return the one :class:`~pytest_gpumem.breakdown.Breakdown`.
"""
