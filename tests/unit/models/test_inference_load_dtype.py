"""load_inference_model materializes a decoding model in its decode dtype (bf16 on CUDA;
forced here on CPU) and loads the checkpoint into it: the weights never exist in fp32 on
the device (twice the bytes) and are not drawn at random first."""

import torch
from torch import nn

from offline_rlhf import stage_support
from offline_rlhf.checkpoint import CheckpointMeta, TrainState, save_checkpoint
from offline_rlhf.config.schema import ParallelConfig
from offline_rlhf.models.llama import Transformer
from offline_rlhf.parallel.dims import ParallelDims
from tests.fixtures import TINY, batch, reference_model, runtime_for


def _load(tmp_path, monkeypatch, decoding):
    save_checkpoint(tmp_path / "ckpt", reference_model(), CheckpointMeta(TINY, "lm", TrainState(step=1)))
    rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, TINY), None, tmp_path)
    monkeypatch.setattr(stage_support, "decode_dtype", lambda device: torch.bfloat16)  # what CUDA gets
    materialized, drawn = [], []
    to_empty, init_weights = nn.Module.to_empty, Transformer.init_weights
    monkeypatch.setattr(nn.Module, "to_empty", lambda module, *, device, recurse=True: (
        materialized.append((torch.device(device).type, {p.dtype for p in module.parameters()})),
        to_empty(module, device=device, recurse=recurse))[1])
    monkeypatch.setattr(Transformer, "init_weights", lambda model: (
        drawn.extend(p.device.type for p in model.parameters()), init_weights(model))[1])
    model = stage_support.load_inference_model(tmp_path / "ckpt" / "step_00000001", "lm", rt, "ckpt", decoding)
    return model, [dtypes for device, dtypes in materialized if device != "meta"], set(drawn) - {"meta"}


def test_a_decoding_model_is_materialized_in_bf16_and_loaded_without_a_random_init(tmp_path, monkeypatch):
    model, materialized, drawn = _load(tmp_path, monkeypatch, decoding=True)
    assert materialized == [{torch.bfloat16}] and not drawn
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    expected = reference_model().to(torch.bfloat16)
    # fused q/k/v and gate/up: the loaded weights, exactly the checkpoint's rounded to bf16
    torch.testing.assert_close(model.layers[0].attention.wqkv.weight, torch.cat(
        [expected.layers[0].attention.wq.weight, expected.layers[0].attention.wk.weight,
         expected.layers[0].attention.wv.weight]), atol=0, rtol=0)
    torch.testing.assert_close(model.tok_embeddings.weight, expected.tok_embeddings.weight, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(batch()), expected(batch()), atol=0.05, rtol=0.05)


def test_a_scoring_model_keeps_fp32(tmp_path, monkeypatch):
    model, materialized, drawn = _load(tmp_path, monkeypatch, decoding=False)
    assert materialized == [{torch.float32}] and not drawn
    with torch.no_grad():
        torch.testing.assert_close(model(batch()), reference_model()(batch()), atol=1e-5, rtol=1e-5)
