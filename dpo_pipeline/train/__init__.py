"""Pairs, reference log-probs, DPO training on trl, its overrides, the launchers."""
