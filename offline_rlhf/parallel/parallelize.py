"""Apply parallelism to a model from outside, in torchtitan's order: tensor parallelism
(and sequence parallelism), activation checkpointing, compile, then FSDP2 or DDP over the
data-parallel dimension; finally materialize the meta-device weights and initialize them."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace

import torch
from torch.distributed._composable import checkpoint as activation_checkpoint
from torch.distributed._composable import replicate
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from offline_rlhf.config.schema import ModelConfig
from offline_rlhf.models.llama import Transformer
from offline_rlhf.parallel.dims import ParallelDims
from offline_rlhf.parallel.state_dict import load_full_state_dict


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether tensor parallelism holds the model's weights (as DTensor shards)."""
    return any(isinstance(param, DTensor) for param in model.parameters())


def build_mesh(dims: ParallelDims, device: torch.device) -> DeviceMesh | None:
    """A (dp, tp) mesh, or None for a single process (no process group needed)."""
    if dims.world_size == 1:
        return None
    return init_device_mesh(device.type, (dims.dp, dims.tp), mesh_dim_names=("dp", "tp"))


def build_model(cfg: ModelConfig, head: str, dims: ParallelDims, mesh: DeviceMesh | None,
                device: torch.device, param_dtype: torch.dtype | None = None, seed: int = 0) -> Transformer:
    """Build on the meta device, parallelize, then materialize and initialize the weights
    from `seed`. `param_dtype` is FSDP's compute dtype (default: `fsdp_compute_dtype`);
    master weights stay fp32."""
    with torch.device("meta"):
        model = Transformer(cfg, head)
    parallelize(model, dims, mesh, param_dtype or fsdp_compute_dtype(device))
    model.to_empty(device=device)
    model.tie_weights()
    if mesh is not None and device.type == "cpu":
        _init_like_one_process(model, seed)
    else:
        torch.manual_seed(seed)
        model.init_weights()
    model.init_buffers(device)
    return model


def fsdp_compute_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA, what autocast computes in there (`runtime.autocast_for`): FSDP then
    gathers each block's weights in bf16 and frees them after use. Gathered in fp32, each
    forward's bf16 casts of them were kept for the backward, a bf16 copy of the whole model
    on every rank (15 GB for an 8B model), and twice the bytes went over the network. None
    (fp32) on CPU."""
    return torch.bfloat16 if device.type == "cuda" else None


def build_inference_model(cfg: ModelConfig, head: str, dims: ParallelDims, mesh: DeviceMesh | None,
                          device: torch.device) -> Transformer:
    """Tensor parallel as configured, every data-parallel rank a full replica. Replicas
    answer different prompts and run different numbers of forwards, which FSDP's per-forward
    weight gathers cannot survive; decoding also needs whole sequences and logits."""
    inference = replace(dims, dp=1, sequence_parallel=False, loss_parallel=False, activation_checkpointing=False)
    return build_model(cfg, head, inference, mesh, device)


def _init_like_one_process(model: Transformer, seed: int) -> None:
    """Random ops on DTensors over a CPU mesh draw the same numbers on every rank (no
    per-shard offsets), so shards would be copies of each other. CPU models are small:
    initialize a whole one from the seed and load it, the same weights under any layout.
    Seeded after it is built: building on a real device draws its default initialization,
    which one process (building on the meta device) never does."""
    reference = Transformer(model.cfg, model.head)
    torch.manual_seed(seed)
    reference.init_weights()
    load_full_state_dict(model, reference.state_dict())


def parallelize(model: Transformer, dims: ParallelDims, mesh: DeviceMesh | None,
                param_dtype: torch.dtype | None = None) -> Transformer:
    if dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], dims.sequence_parallel, dims.loss_parallel)
        if dims.sequence_parallel:
            model.register_forward_pre_hook(_require_divisible_sequence(dims.tp))
        if dims.compile:
            model.tok_embeddings.register_forward_hook(_finish_collective)
    for block in model.layers:
        if dims.activation_checkpointing:
            activation_checkpoint(block)
        if dims.compile:  # static shapes under TP (`_finish_collective`)
            block.compile(dynamic=False if dims.tp > 1 else None)
    if dims.dp > 1:
        if dims.dp_mode == "ddp":
            replicate(model, device_mesh=mesh["dp"])
        else:
            apply_fsdp(model, mesh["dp"], param_dtype)
    return model


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh, sequence_parallel: bool,
                          loss_parallel: bool) -> None:
    """Megatron-style TP: q/k/v and w1/w3 column-parallel, wo and w2 row-parallel, so each
    block needs one all-reduce (or reduce-scatter + all-gather with sequence parallelism)
    per attention and per MLP. Activations between blocks are Shard(1) (sequence) with SP."""
    between_blocks = Shard(1) if sequence_parallel else Replicate()
    norm_plan = SequenceParallel() if sequence_parallel else None
    top_plan = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=between_blocks)}
    if norm_plan:
        top_plan["norm"] = norm_plan
    if model.head == "lm":
        top_plan["output"] = ColwiseParallel(input_layouts=between_blocks,
                                             output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                             use_local_output=not loss_parallel)
    else:
        # One output value cannot be split: gather the hidden states, keep the head replicated.
        top_plan["score"] = PrepareModuleInput(input_layouts=(between_blocks,), desired_input_layouts=(Replicate(),),
                                               use_local_output=True)
    parallelize_module(model, tp_mesh, top_plan)
    # Embedding and output weights are both Shard(0) over the vocabulary, so a tie survives TP.
    model.tie_weights()
    for block in model.layers:
        parallelize_module(block, tp_mesh, _block_plan(between_blocks, norm_plan))
    if model.cfg.qk_norm:  # each rank's gradient of the q/k norms covers its heads only
        model.head_norm_group = tp_mesh.get_group()


def _finish_collective(module, args, output):
    """The embedding's all-reduce (reduce-scatter with SP) returns a tensor that waits for
    the collective lazily. Passed so into a compiled block, its gradient reached the
    collective's backward as a plain tensor and backward failed (`'Tensor' object has no
    attribute '_local_tensor'`, torch 2.13): wait for it before the first block, by a copy
    (`wait()` returns the bare result, cut from the embedding's gradient). The blocks
    then compile for static shapes: recompiled for a new sequence length with dynamic
    shapes, a block's backward through DTensor ran into unbounded recursion in the tracer
    (torch 2.13). Each new shape compiles once, up to dynamo's recompile limit (8), beyond
    which that shape runs uncompiled."""
    return output.clone() if isinstance(output, AsyncCollectiveTensor) else output


def _require_divisible_sequence(tp: int):
    """Sequence parallelism splits the sequence evenly over TP ranks; an uneven split makes
    gloo/NCCL collectives disagree on sizes and abort, so refuse it with a clear message."""
    def check(module, args):
        seq = args[0].shape[1]
        if seq % tp:
            raise ValueError(f"sequence length {seq} is not divisible by parallel.tp={tp}, which sequence "
                             f"parallelism needs; pad batches to a multiple of {tp}")
    return check


def _block_plan(between_blocks, norm_plan) -> dict:
    gather = dict(input_layouts=(between_blocks, None, None, None),
                  desired_input_layouts=(Replicate(), None, None, None))
    plan = {
        "attention": PrepareModuleInput(**gather),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=between_blocks),
        "feed_forward": PrepareModuleInput(input_layouts=(between_blocks,), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=between_blocks),
    }
    if norm_plan:
        plan["attention_norm"] = norm_plan
        plan["ffn_norm"] = norm_plan
    return plan


def apply_fsdp(model: Transformer, dp_mesh: DeviceMesh, param_dtype: torch.dtype | None) -> None:
    """Shard each block separately (so only one block's full weights live at a time), then the
    root. A value head computes in fp32 whatever `param_dtype` (a reward rounded to bf16 reads
    5.3125 for 5.3, and close pairs tie)."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh, mp_policy=policy)
    if model.head == "value" and param_dtype is not None:
        fully_shard(model.score, mesh=dp_mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32,
                                                                               reduce_dtype=torch.float32))
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)


def loss_context(dims: ParallelDims):
    """Cross-entropy on vocabulary-sharded logits needs `loss_parallel()` around the loss
    and its backward; a no-op otherwise."""
    return loss_parallel() if dims.loss_parallel and dims.tp > 1 else nullcontext()
