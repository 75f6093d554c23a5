"""Stage 4: judgement on records — budget checks, baselines, and the estimate against committed GPU measurements."""
