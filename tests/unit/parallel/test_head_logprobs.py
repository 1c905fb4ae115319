"""The LM head's per-token NLL computed a chunk of labelled positions at a time equals the
NLL of the whole [B, T, V] logits, in value and gradient, and keeps no logits for the backward."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from offline_rlhf.data.batching import collate_sequences
from offline_rlhf.data.tokenize import IGNORE_INDEX
from offline_rlhf.models.masks import document_mask
from offline_rlhf.parallel.logprobs import head_token_nll, model_token_nll, token_nll
from tests.fixtures import TINY, reference_model, sft_sequences

VOCAB, DIM = 1000, 16


def _head_case(seed=0, batch=3, length=40):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, DIM, generator=gen, requires_grad=True)
    output = nn.Linear(DIM, VOCAB, bias=False)
    with torch.no_grad():
        output.weight.copy_(torch.randn(VOCAB, DIM, generator=gen))
    labels = torch.randint(0, VOCAB, (batch, length), generator=gen)
    labels[0, :12] = IGNORE_INDEX  # a prompt
    labels[2, 25:] = IGNORE_INDEX  # padding
    return hidden, output, labels


def _value_and_grads(nll_fn):
    hidden, output, labels = _head_case()
    nll, mask = nll_fn(hidden, output, labels)
    weights = torch.linspace(0.5, 2.0, nll.numel()).view_as(nll)  # per-token weights, as RWR's
    (nll * weights).sum().backward()
    return nll.detach(), mask, hidden.grad, output.weight.grad


@pytest.mark.parametrize("chunk", [1, 7, 64, None], ids=["one_token", "uneven", "one_chunk_exactly", "default"])
def test_chunked_head_nll_equals_the_whole_logits(chunk):
    whole = _value_and_grads(lambda h, out, labels: token_nll(out(h), labels))
    chunked = _value_and_grads(lambda h, out, labels: head_token_nll(h, out, labels, chunk))
    assert torch.equal(chunked[1], whole[1])
    assert int(whole[1].sum()) > 64  # several chunks of 7, one of 64 is not all of them
    for got, want in zip((chunked[0], chunked[2], chunked[3]), (whole[0], whole[2], whole[3])):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(chunked[0][~chunked[1]], torch.zeros(int((~chunked[1]).sum())))


def _whole_entropy(hidden, output, mask):
    """The entropy of each distribution the logits [B, T, V] give at 0..T-2, where `mask`."""
    logp = output(hidden)[:, :-1].log_softmax(-1)
    return torch.where(mask, -(logp.exp() * logp).sum(-1), 0.0)


@pytest.mark.parametrize("chunk", [7, None], ids=["several_checkpointed", "default"])
def test_the_entropy_beside_the_nll_equals_the_whole_logits_and_has_no_gradient(chunk):
    """The PPO actor's metric: from the same chunks, without changing the NLL or its gradient."""
    nll, mask, entropy = _value_and_grads_entropy(chunk)
    hidden, output, labels = _head_case()
    want_nll, want_mask = token_nll(output(hidden), labels)
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(nll, want_nll.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, _whole_entropy(hidden, output, mask).detach(), atol=1e-5, rtol=1e-5)
    assert entropy[mask].min() > 0 and not entropy[~mask].any()
    assert not entropy.requires_grad


class AtenOps(TorchDispatchMode):
    """The names of the aten ops run inside the mode."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_a_checkpointed_chunks_entropy_is_not_computed_again_in_the_backward():
    """The recomputation stops once the tensors the NLL's backward needs exist (non-reentrant
    checkpoint's early stop): the entropy, after them and without a graph, costs the forward only."""
    hidden, output, labels = _head_case()
    nll, _, _ = head_token_nll(hidden, output, labels, 7, entropy=True)
    with AtenOps() as seen:
        nll.sum().backward()
    assert "_log_softmax" in seen.names and "exp" not in seen.names  # recomputed chunks, no entropy


def _value_and_grads_entropy(chunk):
    hidden, output, labels = _head_case()
    nll, mask, entropy = head_token_nll(hidden, output, labels, chunk, entropy=True)
    (nll * torch.linspace(0.5, 2.0, nll.numel()).view_as(nll)).sum().backward()
    with_entropy = (hidden.grad, output.weight.grad)
    _, _, grad_hidden, grad_weight = _value_and_grads(lambda h, out, lab: head_token_nll(h, out, lab, chunk))
    assert torch.equal(with_entropy[0], grad_hidden) and torch.equal(with_entropy[1], grad_weight)
    return nll.detach(), mask, entropy


def test_a_rows_nll_does_not_depend_on_the_rows_batched_with_it():
    """Bit for bit: a resumed scoring pass batches a pair with other pairs than the
    uninterrupted one did. A matmul of one to three rows rounds differently from a larger one
    on the CPU, so the scored rows of a whole batch gathered into one matmul did not."""
    hidden, output, labels = _head_case()
    labels[1, :-2] = IGNORE_INDEX  # a two-token answer
    with torch.no_grad():
        batched, _ = head_token_nll(hidden, output, labels, 64)
        for row in range(len(labels)):
            alone, _ = head_token_nll(hidden[row:row + 1], output, labels[row:row + 1], 64)
            assert torch.equal(alone[0], batched[row]), row


def _saved_bytes(nll_fn) -> int:
    """Bytes of the tensors autograd keeps for the backward of `nll_fn` (distinct storages)."""
    hidden, output, labels = _head_case(length=200)
    storages = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        nll_fn(hidden, output, labels)
    return sum(storages.values())


def test_chunked_head_nll_keeps_no_logits_for_the_backward():
    """The whole logits' NLL keeps [B, T, V] fp32 log-probabilities (2.4 MB here); chunked,
    only what the inputs already hold: the hidden states, the head weight, the labels."""
    logits_bytes = 3 * 199 * VOCAB * 4
    whole = _saved_bytes(lambda h, out, labels: token_nll(out(h), labels))
    chunked = _saved_bytes(lambda h, out, labels: head_token_nll(h, out, labels, 32))
    with_entropy = _saved_bytes(lambda h, out, labels: head_token_nll(h, out, labels, 32, entropy=True))
    assert whole >= logits_bytes
    assert chunked < logits_bytes / 10
    assert with_entropy == chunked


def test_a_batch_without_labels_keeps_its_graph():
    hidden, output, labels = _head_case()
    nll, mask, entropy = head_token_nll(hidden, output, torch.full_like(labels, IGNORE_INDEX), 8, entropy=True)
    nll.sum().backward()
    assert not mask.any() and torch.equal(nll, torch.zeros_like(nll))
    assert torch.equal(entropy, torch.zeros_like(nll))
    assert torch.equal(output.weight.grad, torch.zeros_like(output.weight))


def test_the_model_chunked_loss_equals_its_logits_loss_for_packed_rows():
    """Through the model's forward (`head_fn`), with packed documents' mask: every parameter's gradient."""
    batch = collate_sequences(sft_sequences(2), pad_id=0)
    mask = document_mask(batch["document_ids"])
    grads = []
    for nll_fn in (lambda m: token_nll(m(batch["tokens"], positions=batch["positions"], attn_mask=mask),
                                       batch["labels"]),
                   lambda m: model_token_nll(m, batch, attn_mask=mask, chunk_tokens=5)):
        model = reference_model(TINY)
        nll, _ = nll_fn(model)
        nll.sum().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_value_head_refuses_head_fn():
    with pytest.raises(ValueError, match="value head"):
        reference_model(TINY, head="value")(torch.zeros(1, 4, dtype=torch.long), head_fn=head_token_nll)
