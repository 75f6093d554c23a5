"""Stage 3: measuring GPU memory for real — snapshots, samplers, the OOM parser, and a GRPO run in a child process."""
