"""The Llama-family decoder, its heads and Hugging Face adapters."""
