"""Reward scoring (and, later, normalization and reward-distribution plots)."""
