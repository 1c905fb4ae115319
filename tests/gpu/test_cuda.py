"""On a CUDA device: the decode step replayed as CUDA graphs gives what the same step run
eagerly at the same shapes gives (greedy and sampled), decode attention over a KeySpan
(FlexAttention, compiled and captured) equals the mask path, fused projections decode what
separate ones decode, the packed-sequence FlexAttention route equals the dense mask, the chunked LM head equals the
whole logits in bf16, and a stage trains and reloads on the GPU.
Skipped where CUDA is absent (tests/conftest.py)."""

from __future__ import annotations

import copy
import json
import subprocess

import pytest
import torch

from offline_rlhf.cli import main as orlhf
from offline_rlhf.config.schema import GenerationConfig
from offline_rlhf.data.batching import collate_sequences
from offline_rlhf.data.packing import pack_samples
from offline_rlhf.data.tokenize import IGNORE_INDEX
from offline_rlhf.generation import decode
from offline_rlhf.generation.engine import DecodeSession, EngineStats, Request, run
from offline_rlhf.generation.sampling import stream_id
from offline_rlhf.losses.logprobs import shifted_token_nll
from offline_rlhf.losses.sft import sft_loss
from offline_rlhf.models.llama import fuse_projections
from offline_rlhf.models.masks import dense_document_mask, flex_document_mask
from offline_rlhf.parallel.logprobs import head_token_nll, token_nll
from tests.fixtures import REPO_ROOT, reference_model
from tests.unit.generation.test_engine import PAD, prompts_of_lengths
from tests.unit.models.test_packed_attention import _samples

CUDA = torch.device("cuda")
LENGTHS = [3, 9, 1, 6, 14, 2, 5, 11, 4, 7, 8]
STEP_ROWS = [(5, 9, 2), (17, 3, 0), (40, 20, 11), (0, 0, 0)]  # token, column, start


@pytest.fixture(autouse=True)
def small_buckets(monkeypatch):
    """Width buckets of 8 columns, so one run crosses several. (fp32 matmuls are exact:
    torch leaves TF32 off for them by default.)"""
    assert not torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setattr(decode, "WIDTH_BUCKET", 8)


def completions(model, cfg, prompts, eos=None, static=None, stats=None, session=None):
    requests = [Request(p, stream_id(i, j), cfg.max_new_tokens) for i, p in enumerate(prompts) for j in range(cfg.n)]
    return [c.tokens for c in run(model, requests, cfg, eos, PAD, CUDA, stats=stats, static=static, session=session)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_equals_the_eager_step_at_the_same_shapes(dtype):
    model = reference_model().to(CUDA, dtype).eval()
    prompts = prompts_of_lengths(LENGTHS)
    graphs, eager = EngineStats(), EngineStats()
    replayed = completions(model, GenerationConfig(20, batch_size=5, compile=False), prompts, eos=7, stats=graphs)
    direct = completions(model, GenerationConfig(20, batch_size=5, cuda_graphs=False), prompts, eos=7,
                         static=True, stats=eager)
    assert replayed == direct
    assert graphs.graphs >= 3 and eager.graphs == 0  # several (rows, width) buckets were captured
    assert graphs.admissions == len(prompts) > 5


def test_sampled_graph_replay_equals_the_eager_step():
    """n samples per prompt sharing prefills, drawn at keyed uniforms: the same tokens
    replayed as graphs. (Slot-count independence is exact only in fp32: the CPU tests.)"""
    model = reference_model().to(CUDA).eval()
    prompts = prompts_of_lengths(LENGTHS[:6])
    cfg = GenerationConfig(12, greedy=False, temperature=1.2, top_k=50, seed=5, n=3, batch_size=7, compile=False)
    stats = EngineStats()
    replayed = completions(model, cfg, prompts, stats=stats)
    assert replayed == completions(model, GenerationConfig(**{**cfg.__dict__, "cuda_graphs": False}), prompts,
                                   static=True)
    assert stats.graphs > 0 and stats.prompts_prefilled < len(replayed)  # samples shared prefills
    assert len({tuple(answer) for answer in replayed[:3]}) > 1


@pytest.mark.parametrize("mode,rows", [("default", STEP_ROWS), ("coordinate-descent", STEP_ROWS[:1]),
                                       ("coordinate-descent", STEP_ROWS)], ids=["default", "cd-one-row", "cd-rows"])
def test_the_compiled_step_writes_the_cache_and_gives_the_logits_of_the_eager_step(mode, rows):
    """torch.compile fuses differently from eager, so bf16 results agree to rounding, not bits.
    With coordinate-descent tuning a one-row step's matrix products are inductor's tuned
    reductions instead of cuBLAS calls."""
    model = reference_model().to(CUDA).eval()
    gen = torch.Generator(device=CUDA).manual_seed(0)
    cache = [(torch.randn(5, 2, 24, 16, device=CUDA, generator=gen).bfloat16(),
              torch.randn(5, 2, 24, 16, device=CUDA, generator=gen).bfloat16()) for _ in model.layers]
    inputs = decode.StepInputs.of(rows, CUDA)
    results = []
    for forward in (decode.decode_logits, decode.compiled_decode_logits(mode)):
        kv = [(k.clone(), v.clone()) for k, v in cache]
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            results.append((forward(model, kv, *inputs, 24).float(), kv))
    (eager, eager_kv), (compiled, compiled_kv) = results
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
    for (k, v), (k_eager, v_eager), (k_before, _) in zip(compiled_kv, eager_kv, cache):
        torch.testing.assert_close(k.float(), k_eager.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(v.float(), v_eager.float(), rtol=2e-2, atol=2e-2)
        assert not torch.equal(k[0, :, 9], k_before[0, :, 9])  # the new token's key was written


def test_a_session_replays_its_graphs_in_later_runs_with_weights_changed_in_place():
    """The PPO actor's case: one DecodeSession across iterations, the sampling weights
    refreshed in place between them; the later run captures nothing and decodes what a
    fresh session decodes with the new weights."""
    model = reference_model().to(CUDA).eval()
    cfg = GenerationConfig(12, batch_size=4, compile=False)
    session = DecodeSession(model, CUDA, cfg)
    prompts = prompts_of_lengths(LENGTHS[:4])
    first, again = EngineStats(), EngineStats()
    before = completions(model, cfg, prompts, stats=first, session=session)
    gen = torch.Generator(device=CUDA).manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, device=CUDA, generator=gen))
    after = completions(model, cfg, prompts, stats=again, session=session)
    assert first.graphs > 0 and again.graphs == 0
    assert after == completions(model, cfg, prompts) and after != before


def test_the_default_engine_compiles_once_and_replays_graphs():
    model = reference_model().to(CUDA).eval()
    prompts = prompts_of_lengths(LENGTHS)
    stats = EngineStats()
    answers = completions(model, GenerationConfig(20, batch_size=5), prompts, stats=stats)
    assert [len(answer) for answer in answers] == [20] * len(prompts) and stats.graphs >= 3
    eager = completions(model, GenerationConfig(20, batch_size=5, cuda_graphs=False), prompts)
    agreeing = sum(a[:4] == b[:4] for a, b in zip(answers, eager))
    assert agreeing >= len(prompts) - 2, (answers, eager)  # bf16 rounding may flip a near tie


def captured_step(step, *args):
    """`step(*args)` captured as a CUDA graph after two warm-up runs on a side stream (as
    `decode.StaticStep.capture` does); returns (graph, its logits buffer)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = step(*args)
    return graph, logits


# Per bucket: rows (token, column, start) captured, rows replayed after them, width. Spans
# of one column, starts past 0 (reused slots), positions (column - start) under max_seq_len.
SPAN_BUCKETS = [([[5, 9, 2], [17, 3, 0], [40, 200, 150], [0, 0, 0]],
                 [[6, 10, 2], [18, 4, 4], [41, 201, 150], [1, 255, 200]], 256),
                ([[7, 300, 290], [8, 12, 0], [9, 400, 350]], [[1, 301, 290], [2, 13, 13], [3, 401, 350]], 512)]


def test_compiled_captured_span_decode_equals_the_mask_path_in_bf16():
    """Decode attention over a KeySpan (`flex=True`) against the boolean mask: bf16 weights
    (as `load_inference_model` loads models that decode), the step compiled with dynamic
    shapes and captured at two (rows, width) buckets; each replay reads the rows loaded
    into its inputs, so the spans move with them."""
    model = reference_model().to(CUDA, torch.bfloat16).eval()
    gen = torch.Generator(device=CUDA).manual_seed(0)
    cache = [tuple(torch.randn(6, 2, 520, 16, device=CUDA, generator=gen).bfloat16() for _ in range(2))
             for _ in model.layers]
    compiled = decode.compiled_decode_logits()
    for rows, later, width in SPAN_BUCKETS:
        inputs = decode.StepInputs.of(rows, CUDA)
        with torch.inference_mode():
            replays = {}
            for flex in (False, True):
                kv = [(k.clone(), v.clone()) for k, v in cache]
                replays[flex] = (*captured_step(compiled, model, kv, *inputs, width, flex), kv)
            for new_rows in (rows, later):
                inputs.load(new_rows)
                reference_kv = [(k.clone(), v.clone()) for k, v in replays[False][2]]
                expected = decode.decode_logits(model, reference_kv, *inputs, width).float()
                for graph, logits, _ in replays.values():
                    graph.replay()
                    torch.testing.assert_close(logits.float(), expected, rtol=2e-2, atol=2e-2)
                torch.testing.assert_close(replays[True][1].float(), replays[False][1].float(), rtol=2e-2, atol=2e-2)


def test_the_engine_with_flex_decode_attention_decodes_what_the_mask_decodes():
    model = reference_model().to(CUDA).eval()
    prompts = prompts_of_lengths(LENGTHS)
    stats = EngineStats()
    flex = completions(model, GenerationConfig(20, batch_size=5, decode_attention="flex"), prompts, stats=stats)
    sdpa = completions(model, GenerationConfig(20, batch_size=5), prompts)
    assert stats.graphs >= 3
    agreeing = sum(a[:4] == b[:4] for a, b in zip(flex, sdpa))
    assert agreeing >= len(prompts) - 2, (flex, sdpa)  # bf16 rounding may flip a near tie


def test_fused_projections_decode_what_separate_ones_decode():
    """fp32: the same greedy tokens through the default engine (compiled, graphs; one GEMM
    for q/k/v may round differently from three, so a near tie may flip); bf16: the same
    logits of a compiled step to rounding."""
    model = reference_model().to(CUDA).eval()
    fused = fuse_projections(copy.deepcopy(model))
    prompts = prompts_of_lengths(LENGTHS)
    cfg = GenerationConfig(16, batch_size=5)
    together, apart = completions(fused, cfg, prompts), completions(model, cfg, prompts)
    assert sum(a == b for a, b in zip(together, apart)) >= len(prompts) - 1, (together, apart)
    inputs = decode.StepInputs.of(STEP_ROWS, CUDA)
    gen = torch.Generator(device=CUDA).manual_seed(0)
    cache = [tuple(torch.randn(5, 2, 24, 16, device=CUDA, generator=gen).bfloat16() for _ in range(2))
             for _ in model.layers]
    logits = []
    for weights in (model, fused):
        kv = [(k.clone(), v.clone()) for k, v in cache]
        with torch.inference_mode():
            logits.append(decode.compiled_decode_logits()(weights.bfloat16(), kv, *inputs, 24).float())
    torch.testing.assert_close(logits[1], logits[0], rtol=2e-2, atol=2e-2)


def test_flex_attention_route_equals_the_dense_mask_forward_and_backward():
    model = reference_model().to(CUDA)
    batch = {k: v.to(CUDA) for k, v in collate_sequences(pack_samples(_samples(), seq_len=16), pad_id=0).items()}
    results = []
    for mask in (dense_document_mask(batch["document_ids"]), flex_document_mask(batch["document_ids"])):
        model.zero_grad()
        logits = model(batch["tokens"], positions=batch["positions"], attn_mask=mask)
        loss = sft_loss(*shifted_token_nll(logits, batch["labels"]), normalizer=1.0)[0]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (dense_loss, dense_grads), (flex_loss, flex_grads) = results
    torch.testing.assert_close(flex_loss, dense_loss, rtol=1e-4, atol=1e-4)
    for flex_grad, dense_grad in zip(flex_grads, dense_grads):
        torch.testing.assert_close(flex_grad, dense_grad, rtol=1e-3, atol=1e-4)


def test_smoke_stage_trains_saves_and_reloads_on_the_gpu(tmp_path):
    assert orlhf(["smoke", f"run_dir={tmp_path}", "model=tiny", "steps=30"]) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "smoke" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.4, losses
    [row] = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert row["device_type"] == torch.cuda.get_device_name() and row["status"] == "completed"


def test_generate_and_ppo_stages_run_on_the_gpu(tmp_path):
    """`orlhf generate` (a bf16 inference model, compiled graphs) and one PPO iteration (the
    actor's bf16 sampling replica, its services on GPUs of their own, or on the actor's with
    services.share_gpus=true where there are fewer than four), on tiny checkpoints."""
    from tests.integration.test_ppo_stage import command, prepare
    from tests.synthetic_preferences import synthetic_tokenizer

    tokenizer = tmp_path / "tokenizer"
    synthetic_tokenizer(tokenizer)
    run_dir = prepare(tmp_path / "run", tokenizer)
    prompts = f"sources=[{{name: p, kind: prompts, path: '{run_dir / 'prompts.jsonl'}'}}]"
    assert orlhf(["generate", f"run_dir={run_dir}", prompts, "generation.max_new_tokens=8",
                  "generation.greedy=false", "generation.n=2", "generation.batch_size=4"]) == 0
    samples = [json.loads(line) for line in (run_dir / "generate" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 16 and {s["sample"] for s in samples} == {0, 1}
    share = [] if torch.cuda.device_count() >= 4 else ["services.share_gpus=true"]
    result = subprocess.run(command(run_dir, "ppo.iterations=1", *share), cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    devices = {row["stage"]: row["device_type"] for row in map(json.loads, (run_dir / "ledger.jsonl").open())}
    assert devices == dict.fromkeys(("generate", "ppo_actor", "ppo_reward", "ppo_reference", "ppo_critic"),
                                    torch.cuda.get_device_name())


@pytest.mark.skipif(torch.cuda.device_count() >= 4, reason="the actor and its three services fit")
def test_ppo_services_that_need_more_gpus_than_the_node_has_are_refused_before_weights_load(tmp_path):
    """Was: every service took the actor's GPU 0 (an out-of-memory at 8B)."""
    from tests.integration.test_ppo_stage import command, prepare
    from tests.synthetic_preferences import synthetic_tokenizer

    synthetic_tokenizer(tmp_path / "tokenizer")
    run_dir = prepare(tmp_path / "run", tmp_path / "tokenizer")
    result = subprocess.run(command(run_dir, "ppo.iterations=1"), cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=600)
    count = torch.cuda.device_count()
    refusal = (f"services: the actor's 1 process(es) on this node and the services started beside it (reward 1, "
               f"reference 1, critic 1) need 4 GPUs, one per process, but this node shows {count}")
    assert result.returncode != 0 and refusal in result.stderr, result.stderr[-3000:]
    assert not (run_dir / "ppo" / "critic").exists()  # no service was started


def test_models_that_only_decode_load_in_bf16_and_models_that_score_keep_fp32(tmp_path):
    """A reference model's log-probs are compared with the fp32 policy's: it keeps fp32
    weights; generate/eval/serve models are cast to bf16."""
    from offline_rlhf.checkpoint import CheckpointMeta, TrainState, save_checkpoint
    from offline_rlhf.config.schema import ParallelConfig
    from offline_rlhf.parallel.dims import ParallelDims
    from offline_rlhf.stage_support import load_inference_model
    from tests.fixtures import TINY, runtime_for

    root = tmp_path / "ckpt"
    save_checkpoint(root, reference_model(), CheckpointMeta(TINY, "lm", TrainState(step=1)))
    rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, TINY), None, tmp_path)
    scoring = load_inference_model(root / "step_00000001", "lm", rt, "ckpt")
    decoding = load_inference_model(root / "step_00000001", "lm", rt, "ckpt", decoding=True)
    assert {p.dtype for p in scoring.parameters()} == {torch.float32}
    assert {p.dtype for p in decoding.parameters()} == {torch.bfloat16}
    assert all(p.is_cuda for p in decoding.parameters())
    assert decoding.layers[0].attention.wqkv is not None and scoring.layers[0].attention.wqkv is None  # fused



def test_packed_sft_gives_compiled_flex_attention_one_shape(tmp_path, monkeypatch):
    """Packed rows on CUDA all take max_seq_len (`stages.sft.fixed_length`): FlexAttention,
    compiled for static shapes, sees one sequence length, and the loss goes down."""
    from offline_rlhf.models import llama

    lengths, compiled = set(), llama.compiled_flex_attention()

    def recording(q, *args, **kwargs):
        lengths.add(q.shape[2])
        return compiled(q, *args, **kwargs)
    monkeypatch.setattr(llama, "compiled_flex_attention", lambda: recording)
    assert orlhf(["task", f"run_dir={tmp_path}"]) == 0
    assert orlhf(["sft", f"run_dir={tmp_path}", "model=demo", "data=embedded_task_sft", "data.pack=true",
                  f"init.tokenizer={tmp_path / 'task' / 'tokenizer'}", "data.max_seq_len=96", "train.global_batch=8",
                  "train.micro_batch=4", "optim.lr=3e-3", "train.max_steps=12", "train.val_every=0",
                  "logging.progress=false"]) == 0
    assert lengths == {96}
    rows = map(json.loads, (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines())
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    assert len(losses) == 12 and losses[-1] < losses[0], losses


def test_the_chunked_lm_head_under_bf16_autocast_matches_the_whole_logits_in_less_memory():
    """Autocast's bf16 head, fp32 cross-entropy: chunks of 256 labelled tokens (recomputed in
    the backward) give the whole logits' loss and gradients at a fraction of their memory."""
    variants = {"whole": lambda h, out, labels: token_nll(out(h), labels),
                "chunked": lambda h, out, labels: head_token_nll(h, out, labels, 256)}
    results, peaks = [], []
    for nll_fn in variants.values():
        torch.manual_seed(0)
        hidden = torch.randn(2, 1024, 256, device=CUDA, requires_grad=True)
        head = torch.nn.Linear(256, 32000, bias=False, device=CUDA)
        labels = torch.randint(0, 32000, (2, 1024), device=CUDA)
        labels[:, :256] = IGNORE_INDEX
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            nll, mask = nll_fn(hidden, head, labels)
            loss = (nll * mask).sum() / mask.sum()
        loss.backward()
        peaks.append(torch.cuda.max_memory_allocated() - before)
        results.append((loss.detach(), hidden.grad, head.weight.grad))
    for whole, chunked in zip(*results):
        torch.testing.assert_close(chunked, whole, atol=2e-3, rtol=2e-2)
    assert peaks[0] > 2 * 1023 * 32000 * 4  # the whole logits in fp32, at least
    assert peaks[1] < peaks[0] / 3
