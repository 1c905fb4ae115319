"""The value head (rewards, critic values) computes in fp32 under bf16 autocast (what
training and scoring run under on CUDA; CPU autocast takes the same path)."""

import torch

from tests.fixtures import TINY, reference_model


def test_value_head_is_not_rounded_to_bf16_under_autocast():
    model = reference_model(TINY, "value").eval()
    torch.nn.init.normal_(model.score.weight, std=2.0)  # rewards of a few units, as a trained reward model gives
    seen = []
    model.score.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    tokens = torch.randint(0, TINY.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        values = model(tokens)
    assert values.dtype == torch.float32
    hidden = seen[0]
    assert hidden.dtype == torch.float32
    torch.testing.assert_close(values, (hidden @ model.score.weight.T).squeeze(-1), atol=1e-5, rtol=1e-6)
    assert (values != values.bfloat16().float()).float().mean() > 0.9  # bf16 rounding would move almost all
