"""Non-finite and out-of-range numbers in a config are one-line errors naming the key:
`optim.lr=inf` or `rwr_beta=nan` pass every `<= 0` check (NaN compares false) and used to
train silently on NaN with exit 0."""

import pytest

from offline_rlhf.cli import main


@pytest.mark.parametrize("stage,required,override,key", [
    ("align", "data.path=x.jsonl", "optim.lr=inf", "optim.lr"),
    ("align", "data.path=x.jsonl", "optim.lr=nan", "optim.lr"),
    ("align", "data.path=x.jsonl", "rwr_beta=inf", "rwr_beta"),
    ("align", "data.path=x.jsonl", "filter_threshold=nan", "filter_threshold"),
    ("align", "data.path=x.jsonl", "dt_target=-inf", "dt_target"),
    ("align", "data.path=x.jsonl", "train.epochs=inf", "train.epochs"),
    ("align", "data.path=x.jsonl", "optim.grad_clip=nan", "optim.grad_clip"),
    ("rm", "margin=0", "margin=nan", "margin"),
    ("mix", "input=x.jsonl", "weights.sft=nan", "weights.sft"),
    ("mix", "input=x.jsonl", "weights.generated=inf", "weights.generated"),
    ("sft", "optim.lr=1e-4", "data.sources.0.weight=nan", "data.sources.0.weight"),
    ("generate", "init.checkpoint=ck", "generation.temperature=nan", "generation.temperature"),
])
def test_non_finite_float_is_a_one_line_config_error(stage, required, override, key, capsys):
    extra = ["sources=[{kind: prompts, path: p.jsonl}]"] if stage == "generate" else []
    assert main([stage, required, *extra, override, "--cfg"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"orlhf {stage}: error: {key}: must be a finite number, got "
                                        f"{override.split('=')[1]}"]


@pytest.mark.parametrize("override,message", [
    ("optim.beta2=1.0", "optim.beta2: must be in [0, 1), got 1.0"),
    ("optim.beta1=-0.1", "optim.beta1: must be in [0, 1), got -0.1"),
    ("optim.eps=0", "optim.eps: must be > 0, got 0.0"),
    ("optim.weight_decay=-1", "optim.weight_decay: must be >= 0, got -1.0"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio: must be in [0, 1], got 2.0"),
    ("optim.warmup_steps=-3", "optim.warmup_steps: must be >= 0, got -3"),
    ("train.max_skipped_fraction=1.5", "train.max_skipped_fraction: must be in [0, 1], got 1.5"),
])
def test_optimizer_ranges_are_checked_before_torch_sees_them(override, message, capsys):
    """beta2=1 was a torch traceback at the first step; eps=0 turned every weight with a
    zero gradient (unused token rows) into NaN."""
    assert main(["align", "data.path=x.jsonl", override, "--cfg"]) == 2
    assert message in capsys.readouterr().err


def test_finite_defaults_still_compose(capsys):
    assert main(["align", "data.path=x.jsonl", "optim.lr=1e30", "train.max_skipped_fraction=0", "--cfg"]) == 0
    assert "max_skipped_fraction: 0" in capsys.readouterr().out
