"""The Llama-family decoder, its heads and Hugging Face adapters."""

from offline_rlhf.models.llama import Transformer, last_token_values

__all__ = ["Transformer", "last_token_values"]
