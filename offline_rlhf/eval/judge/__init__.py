"""The LLM judge: FastChat's MT-bench prompts and the paper's Appendix A prompt, sent to
any OpenAI-compatible endpoint, parsed, logged durably and summarized (no torch)."""
