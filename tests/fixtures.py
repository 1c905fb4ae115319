"""Shared fixtures for layout-comparison tests: a tiny config, a seeded reference model and
a batch, identical in every process."""

from __future__ import annotations

from pathlib import Path

import torch

from offline_rlhf.config.schema import ModelConfig, ParallelConfig
from offline_rlhf.models.llama import Transformer
from offline_rlhf.parallel.dims import ParallelDims
from offline_rlhf.parallel.distributed import detect_env, device_for
from offline_rlhf.parallel.parallelize import build_mesh, build_model
from offline_rlhf.parallel.state_dict import load_full_state_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
TINY = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)

TINY_TIED = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64,
                        tie_embeddings=True)


def reference_model(cfg: ModelConfig = TINY, head: str = "lm", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg, head)
    model.init_weights()
    return model


def batch(cfg: ModelConfig = TINY, size: int = 4, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (size, seq), generator=torch.Generator().manual_seed(seed))


def parallel_copy(reference: Transformer, world_size: int, **parallel) -> tuple[Transformer, ParallelDims, object]:
    """The reference weights in a model parallelized as `parallel` (ParallelConfig fields)."""
    dims = ParallelDims.build(ParallelConfig(**parallel), world_size, reference.cfg)
    device = device_for(detect_env())
    mesh = build_mesh(dims, device)
    model = build_model(reference.cfg, reference.head, dims, mesh, device)
    load_full_state_dict(model, reference.state_dict())
    return model, dims, mesh


def runtime_for(dims: ParallelDims, mesh, stage_dir: Path = Path("/tmp")):
    from offline_rlhf.runtime import Runtime

    return Runtime(env=detect_env(), device=device_for(detect_env()), dims=dims, mesh=mesh, stage_dir=stage_dir)


def sft_sequences(count: int = 8, seed: int = 0):
    """Packed training sequences of random documents with a two-token prompt each."""
    from offline_rlhf.data.packing import pack_samples
    from offline_rlhf.data.tokenize import IGNORE_INDEX, TokenizedSample

    gen = torch.Generator().manual_seed(seed)
    samples = []
    for index in range(count * 4):
        length = int(torch.randint(4, 12, (1,), generator=gen))
        ids = torch.randint(3, TINY.vocab_size, (length,), generator=gen).tolist()
        samples.append(TokenizedSample(tuple(ids), (IGNORE_INDEX, IGNORE_INDEX, *ids[2:]), f"s{index}", False))
    sequences = pack_samples(samples, seq_len=24)
    assert len(sequences) >= count
    return sequences[:count]
