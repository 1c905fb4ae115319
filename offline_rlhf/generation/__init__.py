"""Batched generation with a KV cache.

`config` (GenerationConfig) and `sharding` (shard_indices) import without torch, so stage
configs can use them; `engine` (generate), `sampling` (sample_next) and `kv_cache` hold
the tensor code. Import from the submodules.
"""
