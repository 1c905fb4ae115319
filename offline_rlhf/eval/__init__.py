"""Evaluation: held-out generation scored by a gold reward and the reward model; reports."""
