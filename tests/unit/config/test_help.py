"""`orlhf STAGE --help` lists every key with its default and the field's own comment."""

import subprocess
import sys
from dataclasses import dataclass, field
from typing import ClassVar

from offline_rlhf.cli import STAGES, _load, run
from offline_rlhf.config.compose import composed_defaults, dotted_keys
from offline_rlhf.config.help import field_comment, format_keys, key_rows


@dataclass
class Inner:
    # the comment above a field
    # spans lines
    depth: int = 3
    width: int = 2  # trailing comment wins


@dataclass
class Outer:
    name: str = "x"  # what it is called
    inner: Inner = field(default_factory=Inner)
    bare: float = 1.0
    constant: ClassVar[dict[str, str]] = {"a": "b"}  # a class-level table, not a key (`checkpoint_heads`)


def test_field_comments_trailing_and_above():
    assert field_comment(Inner, "depth") == "the comment above a field spans lines"
    assert field_comment(Inner, "width") == "trailing comment wins"
    assert field_comment(Outer, "bare") == ""


def test_key_rows_nest_and_take_values():
    rows = key_rows(Outer, {"name": "y", "inner": {"depth": 7}})
    assert rows == [("name", "y", "what it is called"),
                    ("inner.depth", "7", "the comment above a field spans lines"),
                    ("inner.width", "???", "trailing comment wins"),
                    ("bare", "???", "")]
    assert dotted_keys(Outer) == ["name", "inner.depth", "inner.width", "bare"]
    text = format_keys(rows)
    assert text.splitlines()[1].split() == ["inner.depth", "7", "the", "comment", "above", "a", "field", "spans",
                                            "lines"]


def test_every_stage_lists_every_key_with_the_yaml_default():
    for name, stage in STAGES.items():
        if not stage.schema:
            continue
        schema = _load(stage.schema)
        rows = key_rows(schema, composed_defaults(name, schema))
        assert [key for key, _, _ in rows] == dotted_keys(schema), name
    sft = dict((key, value) for key, value, _ in key_rows(_load(STAGES["sft"].schema),
                                                           composed_defaults("sft", _load(STAGES["sft"].schema))))
    assert sft["init.checkpoint"] == '""'  # sft starts from scratch unless told otherwise


def test_help_output_uses_overrides_and_shows_empty_values(capsys):
    assert run(["align", "--help", "optim.lr=0.25"]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.split()[:1] == ["optim.lr"])
    assert line.split()[1] == "0.25"
    grad = next(row for row in out.splitlines() if row.split()[:1] == ["optim.grad_clip"])
    assert "global gradient-norm limit" in grad
    assert run(["rm-score", "--help"]) == 0
    ckpt = next(row for row in capsys.readouterr().out.splitlines() if row.split()[:1] == ["ckpt"])
    assert ckpt.split()[1] == '""'


def test_help_from_the_command_line_lists_nested_keys():
    out = subprocess.run([sys.executable, "-m", "offline_rlhf.cli", "sft", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "train.global_batch" in out and "optim.warmup_steps" in out


def test_every_key_of_every_stage_has_a_description():
    """`--help` is the key reference: a field without a comment is a key users cannot look up."""
    missing = []
    for name, stage in STAGES.items():
        if stage.schema:
            missing += [f"{name}: {key}" for key, _, text in key_rows(_load(stage.schema), {}) if not text]
    assert not missing, "fields without a comment (add `# ...` after them): " + ", ".join(missing)


def test_help_into_a_closed_pipe_stops_quietly():
    """`orlhf sft --help | head -1`: was a BrokenPipeError traceback once head had gone."""
    process = subprocess.Popen([sys.executable, "-m", "offline_rlhf.cli", "sft", "--help"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the help is printed (start-up takes far longer)
    err = process.stderr.read().decode()
    assert (process.wait(), err) == (141, "")


def test_every_command_prints_its_own_usage(capsys):
    """`orlhf pipeline --help` printed `orlhf launch`'s usage (it runs the launcher)."""
    for name in STAGES:
        for flag in ("--help", "-h"):
            assert run([name, flag]) == 0
            assert capsys.readouterr().out.startswith(f"usage: orlhf {name} "), (name, flag)
    assert run(["pipeline", "pipeline=offline_dt", "--help"]) == 0
    assert "runs/<pipeline name>" in capsys.readouterr().out
