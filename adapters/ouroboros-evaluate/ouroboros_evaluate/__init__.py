"""Held-out evaluation of trained Ouroboros arms against the full and the pruned model (`ouroboros eval`):
next-token NLL and gap recovery per corpus (`ouroboros_evaluate.evaluate.evaluate`). Benchmarks through lm-eval
live in the ouroboros-lm-eval adapter."""
