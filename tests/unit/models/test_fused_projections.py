"""A model with fused q/k/v and gate/up projections (`fuse_projections`, for models that
only generate) computes what the unfused model computes, refuses what it cannot do (be
saved, be fused when tensor-parallel), and is what `load_inference_model` gives a stage
that decodes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from offline_rlhf.checkpoint import CheckpointMeta, TrainState, save_checkpoint
from offline_rlhf.config.schema import GenerationConfig, ModelConfig, ParallelConfig
from offline_rlhf.generation.engine import generate
from offline_rlhf.generation.kv_cache import PromptWrite, TokenWrite, new_cache
from offline_rlhf.models.llama import fuse_projections
from offline_rlhf.parallel.dims import ParallelDims
from offline_rlhf.stage_support import load_inference_model
from tests.fixtures import TINY, batch, reference_model, runtime_for
from tests.unit.generation.test_engine import PAD, prompts_of_lengths

CONFIGS = {
    "grouped": TINY,
    "grouped-bias": ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                                max_seq_len=64, qkv_bias=True),
    "ungrouped-bias-tied": ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=96,
                                       max_seq_len=64, qkv_bias=True, tie_embeddings=True),
}


def unfused_and_fused(cfg: ModelConfig):
    model = reference_model(cfg).eval()
    with torch.no_grad():  # init_weights zeroes biases: make them count
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(std=0.5)
    return model, fuse_projections(copy.deepcopy(model))


@pytest.fixture(params=list(CONFIGS), scope="module")
def models(request):
    return unfused_and_fused(CONFIGS[request.param])


def test_fusion_replaces_the_projections_and_keeps_the_parameter_count(models):
    model, fused = models
    names = {name for name, _ in fused.named_parameters()}
    assert not any(part in name for name in names for part in (".wq.", ".wk.", ".wv.", ".w1.", ".w3."))
    assert {"layers.0.attention.wqkv.weight", "layers.1.feed_forward.w13.weight"} <= names
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in model.parameters())
    assert (fused.output.weight is fused.tok_embeddings.weight) == model.cfg.tie_embeddings


def test_fused_logits_equal_for_a_plain_forward(models):
    model, fused = models
    tokens = batch(model.cfg, size=3, seq=12)
    with torch.no_grad():
        torch.testing.assert_close(fused(tokens), model(tokens), rtol=1e-5, atol=1e-5)


def test_fused_logits_equal_for_a_prefill_and_a_decode_step_with_the_cache(models):
    """Prefill two prompts into slots 1 and 0, then decode one token in each."""
    results = []
    prompts = batch(models[0].cfg, size=2, seq=7)
    for model in models:
        cache = new_cache(len(model.layers), slots=3, max_len=16)
        mask = torch.ones(2, 1, 7, 7, dtype=torch.bool).tril()
        with torch.no_grad():
            writes = [PromptWrite(layer, torch.tensor([1, 0])) for layer in cache]
            prefill = model(prompts, attn_mask=mask, cache=writes, last_only=True)[:, -1]
            columns, keys = torch.tensor([7, 7]), torch.arange(8)
            writes = [TokenWrite(layer.k, layer.v, columns, 8) for layer in cache]
            step = model(prefill.argmax(-1)[[1, 0], None], columns[:, None], (keys <= 7)[None, None, None, :].expand(
                2, 1, 1, 8), cache=writes)[:, -1]
        results.append((prefill, step, cache[1].k[:2, :, :8].clone()))
    for unfused_value, fused_value in zip(*results):
        torch.testing.assert_close(fused_value, unfused_value, rtol=1e-5, atol=1e-5)


def test_fused_greedy_generation_gives_the_same_tokens(models):
    model, fused = models
    prompts = prompts_of_lengths([3, 9, 1, 6, 14], model.cfg.vocab_size)
    cfg = GenerationConfig(12, batch_size=3)
    expected = generate(model, prompts, cfg, None, PAD, "cpu")
    assert generate(fused, prompts, cfg, None, PAD, "cpu") == expected
    assert len({tuple(answer) for answer in expected}) > 1


def test_a_fused_model_cannot_be_saved_or_fused_again(tmp_path, models):
    _, fused = models
    with pytest.raises(ValueError, match="fused"):
        fused.state_dict()
    with pytest.raises(ValueError, match="fused"):
        save_checkpoint(tmp_path / "ckpt", fused, CheckpointMeta(fused.cfg, "lm", TrainState(step=1)))
    with pytest.raises(ValueError, match="already fused"):
        fuse_projections(fused)


@pytest.fixture
def tp_mesh():
    """A tensor-parallel mesh of one gloo process: TP's DTensor parameters, no second process."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
    finally:
        dist.destroy_process_group()


def test_a_tensor_parallel_model_is_refused(tp_mesh):
    from offline_rlhf.parallel.parallelize import apply_tensor_parallel

    model = reference_model()
    apply_tensor_parallel(model, tp_mesh, sequence_parallel=False, loss_parallel=False)
    with pytest.raises(ValueError, match="sharded"):
        fuse_projections(model)
    assert model.layers[0].attention.wqkv is None and hasattr(model.layers[0].attention, "wq")  # left as it was


def test_load_inference_model_fuses_models_that_only_decode(tmp_path):
    model = reference_model()
    save_checkpoint(tmp_path / "ckpt", model, CheckpointMeta(TINY, "lm", TrainState(step=1)))
    rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, TINY), None, tmp_path)
    path = tmp_path / "ckpt" / "step_00000001"
    scoring = load_inference_model(path, "lm", rt, "ckpt")
    decoding = load_inference_model(path, "lm", rt, "ckpt", decoding=True)
    assert scoring.layers[0].attention.wqkv is None and decoding.layers[0].attention.wqkv is not None
    assert decoding.layers[1].feed_forward.w13 is not None and not decoding.training
    tokens = batch(TINY, size=2, seq=9)
    with torch.no_grad():
        torch.testing.assert_close(decoding(tokens), model(tokens), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scoring(tokens), model(tokens), rtol=1e-5, atol=1e-5)
