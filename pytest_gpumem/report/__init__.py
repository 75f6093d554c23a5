"""Stage 5: rendering records — one module per format."""
