"""Typed configs (dataclasses), Hydra composition and validation."""
