"""What to change: explain an OOM, rank the levers, fit a setup to a GPU. It re-estimates; it never measures."""
