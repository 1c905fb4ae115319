"""Batched generation with a KV cache.

`engine` (generate, run: continuous batching), `decode` (one decode step), `sampling`
(sample_next) and `kv_cache` hold the tensor code; `shards` holds the per-replica answer
shards and which prompts each replica takes (shard_indices). The settings are
`offline_rlhf.config.schema.GenerationConfig`, which imports without torch. Import from
the submodules.
"""
