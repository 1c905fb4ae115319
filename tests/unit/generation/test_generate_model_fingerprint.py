"""A partial output (generate's shards, reference's log-probs) resumes only with the model
that wrote it: a step folder replaced by another training's under the same name differs by
its metadata, read without the weight shards."""

import pytest

from offline_rlhf.checkpoint import CONFIG_KEY, CheckpointMeta, TrainState, save_checkpoint
from offline_rlhf.config.compose import compose_stage
from offline_rlhf.config.errors import ResumeRefused
from offline_rlhf.config.samples import GenerateConfig
from offline_rlhf.stage_support import check_resumable, model_fingerprint
from tests.fixtures import TINY, reference_model


def save_sft(root, seed, lr):
    meta = CheckpointMeta(TINY, "lm", TrainState(step=3, tokens_seen=300), metadata={CONFIG_KEY: {"optim.lr": lr}})
    return save_checkpoint(root, reference_model(seed=seed), meta)


def test_a_retrained_checkpoint_at_the_same_path_is_another_model(tmp_path):
    cfg = compose_stage("generate", GenerateConfig, [f"run_dir={tmp_path}"])
    first = save_sft(tmp_path / "sft", seed=0, lr=1e-5)
    written = model_fingerprint(cfg, first)
    assert model_fingerprint(cfg, first) == written  # the same checkpoint read again
    retrained = save_sft(tmp_path / "sft", seed=1, lr=2e-5)  # the SFT run again, with another learning rate
    assert retrained == first
    current = model_fingerprint(cfg, retrained)
    assert current["model_step"] == written["model_step"] and current != written
    with pytest.raises(ResumeRefused) as info:
        check_resumable(written, current, tmp_path / "generate")
    assert str(info.value).startswith("model_meta_sha256: differs from the run that wrote")
    assert "delete" in str(info.value)
