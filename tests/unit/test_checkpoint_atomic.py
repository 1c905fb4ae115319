"""A save killed between writing the shards and publishing must not become `latest`."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from offline_rlhf.checkpoint import (
    CheckpointMeta,
    TrainState,
    is_complete,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.models.llama import Transformer
from tests.fixtures import REPO_ROOT, TINY, batch, reference_model

KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import offline_rlhf.checkpoint as ckpt
    from tests.fixtures import TINY, reference_model

    def die_before_publish(partial, final):  # shards and meta.json are written; the rename is next
        os.kill(os.getpid(), signal.SIGKILL)

    ckpt._publish = die_before_publish
    meta = ckpt.CheckpointMeta(model=TINY, head="lm", train_state=ckpt.TrainState(step=2))
    ckpt.save_checkpoint(sys.argv[1], reference_model(seed=2), meta)
""")


def _meta(step):
    return CheckpointMeta(model=TINY, head="lm", train_state=TrainState(step=step, tokens_seen=10 * step,
                                                                         data_position={"epoch": 0, "index": step}))


def test_killed_save_is_not_picked_up_as_latest(tmp_path):
    root = tmp_path / "ckpt"
    save_checkpoint(root, reference_model(seed=1), _meta(1))
    result = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(root)], cwd=REPO_ROOT, capture_output=True)
    assert result.returncode == -9, result.stderr.decode()
    partial = root / "step_00000002.partial"
    assert (partial / "meta.json").exists() and (partial / ".metadata").exists()  # killed after the shards
    assert not is_complete(partial)
    assert latest_checkpoint(root) == root / "step_00000001"
    model = Transformer(TINY)
    load_checkpoint(latest_checkpoint(root), model)
    torch.testing.assert_close(model(batch()), reference_model(seed=1)(batch()))
    # The next save of that step clears the leftover and publishes normally.
    save_checkpoint(root, reference_model(seed=2), _meta(2))
    assert latest_checkpoint(root) == root / "step_00000002" and not partial.exists()


def test_a_kill_while_a_saved_again_step_is_replaced_leaves_a_loadable_latest(tmp_path, monkeypatch):
    """Saving the step `latest` names again used to delete the old folder before the new one
    took its place: killed mid-deletion, `latest` named a half-deleted folder and the stage
    could not resume."""
    root = tmp_path / "ckpt"
    save_checkpoint(root, reference_model(seed=1), _meta(1))
    deleting = shutil.rmtree

    def killed_mid_deletion(path, *args, **kwargs):  # deletes the metadata, then the process dies
        (Path(path) / "meta.json").unlink(missing_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_mid_deletion)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(root, reference_model(seed=2), _meta(1))
    monkeypatch.setattr(shutil, "rmtree", deleting)
    model = Transformer(TINY)
    load_checkpoint(latest_checkpoint(root), model)  # the new save of the step, whole
    torch.testing.assert_close(model(batch()), reference_model(seed=2)(batch()))
    save_checkpoint(root, reference_model(seed=3), _meta(2))  # the next save clears what was set aside
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001", "step_00000002"]


def test_meta_round_trip_and_pruning(tmp_path):
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        save_checkpoint(root, reference_model(), _meta(step), keep_last=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000003"]
    meta = read_meta(latest_checkpoint(root))
    assert meta.model == TINY and meta.train_state == _meta(3).train_state and not meta.has_optimizer
    for step in (4, 5):  # keep_last=0: every checkpoint stays
        save_checkpoint(root, reference_model(), _meta(step), keep_last=0)
    assert sorted(p.name for p in root.glob("step_*")) == [f"step_0000000{step}" for step in (2, 3, 4, 5)]
    save_checkpoint(root, reference_model(), _meta(6), keep_last=6)  # more than there are: none goes
    assert sorted(p.name for p in root.glob("step_*")) == [f"step_0000000{step}" for step in (2, 3, 4, 5, 6)]


def test_loading_optimizer_from_weights_only_checkpoint_is_an_error(tmp_path):
    save_checkpoint(tmp_path, reference_model(), _meta(1))
    model = Transformer(TINY)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        load_checkpoint(latest_checkpoint(tmp_path), model, torch.optim.AdamW(model.parameters()))


def test_latest_naming_an_incomplete_folder_is_an_error(tmp_path):
    save_checkpoint(tmp_path, reference_model(), _meta(1))
    (tmp_path / "step_00000001" / "meta.json").unlink()
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/latest: names step_00000001, which is not a complete "
                                          "checkpoint .*; write the name of a complete step_\\* folder into it"):
        latest_checkpoint(tmp_path)


def test_only_named_parameters_may_be_missing(tmp_path):
    from dataclasses import replace

    save_checkpoint(tmp_path, reference_model(), _meta(1))  # an LM checkpoint of TINY
    value_model = Transformer(TINY, head="value")
    load_checkpoint(latest_checkpoint(tmp_path), value_model, may_lack=("score.weight",))  # a new RM head
    with pytest.raises(ValueError, match=r"lacks 1 parameter\(s\) of this model, first \['score.weight'\]"):
        load_checkpoint(latest_checkpoint(tmp_path), Transformer(TINY, head="value"))
    deeper = Transformer(replace(TINY, n_layers=3))
    with pytest.raises(ValueError, match="another architecture"):
        load_checkpoint(latest_checkpoint(tmp_path), deeper, may_lack=("score.weight",))


def test_a_root_without_latest_but_with_checkpoints_is_refused_not_started_over(tmp_path):
    """Was: a fresh start there saved step 12, pruning kept the old steps 80 and 104, and
    `latest` named the deleted step 12."""
    for step in (80, 104):
        save_checkpoint(tmp_path, reference_model(), _meta(step))
    (tmp_path / "latest").unlink()
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/latest: is missing, but {tmp_path} holds complete "
                                          r"checkpoints \(step_00000080, step_00000104\); write the name of the one "
                                          r"to resume from \(the newest: step_00000104\) into"):
        latest_checkpoint(tmp_path)


def test_pruning_keeps_the_step_just_saved_below_older_higher_ones(tmp_path):
    """A resume from an earlier step (its name written into `latest`) saves below steps left
    from before: the new save stays, whatever keep_last."""
    for step in (3, 9):
        save_checkpoint(tmp_path, reference_model(), _meta(step))
    (tmp_path / "latest").write_text("step_00000003")
    save_checkpoint(tmp_path, reference_model(), _meta(4), keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000004"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000004"


def test_pruning_after_a_rollback_keeps_the_runs_own_earlier_step(tmp_path):
    """Rolled back to step 30 (`latest` edited), the run saves 37: the fallback kept beside
    it is its own step 30, not the abandoned 40 (which was kept, and 30 deleted)."""
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, reference_model(), _meta(step), keep_last=0)
    (tmp_path / "latest").write_text("step_00000030")
    save_checkpoint(tmp_path, reference_model(), _meta(37), keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000030", "step_00000037"]


def test_a_save_clears_partial_folders_of_any_killed_save(tmp_path):
    (tmp_path / "step_00000006.partial").mkdir(parents=True)  # a save of step 6 killed; the rerun saves step 5
    save_checkpoint(tmp_path, reference_model(), _meta(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000005"]


def test_a_missing_rng_state_is_a_damaged_checkpoint_not_a_traceback(tmp_path):
    save_checkpoint(tmp_path, reference_model(), _meta(1))
    (tmp_path / "step_00000001" / "rng" / "rank00000.pt").unlink()
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/step_00000001/rng: the checkpoint is damaged \(rank00000.pt "
                                          r"is unreadable: FileNotFoundError\); load an earlier step_\* folder of "):
        load_checkpoint(latest_checkpoint(tmp_path), Transformer(TINY), restore_rng=True)
