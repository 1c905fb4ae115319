"""The shipped stage configs work anywhere: they name public datasets by Hugging Face hub id,
never the development checkout's ../shared, and a stage run with its defaults where the hub
cannot be reached stops with one line naming the dataset and how to point at a local copy.

../shared is hidden for real: the project (conf/ and its packages) is copied into a folder
with no ../shared beside it, and the configs are composed and a stage is run there, in a
subprocess that imports the copy (so `${repo:...}` resolves against the copy's root)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from offline_rlhf.cli import STAGES
from offline_rlhf.config.compose import compose_stage
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.evaluation import EvalConfig
from offline_rlhf.config.samples import GenerateConfig, LabelConfig, LabelInputConfig, PromptSourceConfig
from offline_rlhf.data.hub_datasets import hub_options
from offline_rlhf.data.prompts import read_prompt_source, read_prompt_turns
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.hub import parse_repo_id
from offline_rlhf.labeling.samples import read_samples
from offline_rlhf.stages.eval import held_out_prompts
from offline_rlhf.stages.label import read_inputs
from tests.fixtures import REPO_ROOT
from tests.unit.data.test_hub_datasets import HH_FILE, OASST_TREES, dataset_repo, jsonl_rows, oasst_message_table
from tests.unit.test_hub import offline_hub

PROJECT_PARTS = ("conf", "offline_rlhf", "ppo_baseline", "launcher")
# Keys without a default (checkpoints, files to score): a user always passes them.
REQUIRED = {"serve": ["ckpt=ckpts/model"], "judge": ["questions=questions.jsonl", "judge_prompts=judge_prompts.jsonl",
              "judge.base_url=http://127.0.0.1:8000/v1", "judge.model=judge"],
            "rm-score": ["ckpt=ckpts/rm", "input=in.jsonl", "output=out.jsonl"],
            "convert": ["action=import_hf", "hf_dir=org/model", "out=ckpts/model"]}
# Composes every stage in the copy and prints {stage: {dotted key: str value}} and CONF_DIR.
COMPOSE = """
import dataclasses, importlib, json, sys
from offline_rlhf.cli import STAGES
from offline_rlhf.config.compose import CONF_DIR, compose_stage

def strings(value, key=""):
    if dataclasses.is_dataclass(value):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
    if items is None:
        return {key: value} if isinstance(value, str) else {}
    return {k: v for name, item in items for k, v in strings(item, f"{key}.{name}" if key else str(name)).items()}

required = json.loads(sys.argv[1])
out = {"conf_dir": str(CONF_DIR), "stages": {}}
for name, stage in STAGES.items():
    if stage.schema:
        module, _, attr = stage.schema.partition(":")
        schema = getattr(importlib.import_module(module), attr)
        out["stages"][name] = strings(compose_stage(name, schema, required.get(name, [])))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The project as a user's clone has it: no ../shared beside it."""
    root = tmp_path_factory.mktemp("clone") / "project"
    for part in PROJECT_PARTS:
        shutil.copytree(REPO_ROOT / part, root / part, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    assert not (root.parent / "shared").exists()
    return root


def run_in(project: Path, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python ARGS` in the copy, importing the copy's packages; `env` replaces os.environ."""
    env = {**(os.environ if env is None else env), "PYTHONPATH": str(project)}
    return subprocess.run([sys.executable, *args], cwd=project, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def composed(project) -> dict[str, dict[str, str]]:
    """{stage: {dotted key: resolved string value}} of every stage composed in the copy."""
    result = run_in(project, ["-c", COMPOSE, json.dumps(REQUIRED)])
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert Path(out["conf_dir"]).resolve() == project / "conf"  # the copy was composed, not this checkout
    return out["stages"]


def test_every_stage_with_a_schema_composes_without_shared(composed):
    assert set(composed) == {name for name, stage in STAGES.items() if stage.schema}


@pytest.mark.parametrize("stage", [name for name, stage in STAGES.items() if stage.schema])
def test_no_shipped_value_points_into_shared(composed, stage):
    assert {key: value for key, value in composed[stage].items() if "shared" in value} == {}


def test_the_shipped_data_and_prompt_sources_are_hub_datasets(composed):
    data = {f"{stage}: {key}": value for stage in ("sft", "rm") for key, value in composed[stage].items()
            if key.startswith("data.sources.") and key.endswith(".path")}
    prompts = {f"{stage}: {key}": value for stage in ("generate", "ppo") for key, value in composed[stage].items()
               if key.startswith("sources.") and key.endswith(".path")}
    label = composed["label"]
    human = {f"label: {key}": value for key, value in label.items() if key.startswith("inputs.")
             and key.endswith(".path") and label[key.replace(".path", ".kind")] != "generated"}
    assert len(data) >= 3 and len(prompts) >= 2 and len(human) >= 2
    assert {key: value for key, value in {**data, **prompts, **human}.items() if parse_repo_id(value) is None} == {}


def test_a_stage_run_with_its_defaults_offline_says_in_one_line_which_dataset_and_the_fix(project, tmp_path,
                                                                                         rm_tokenizer_dir):
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    # The tokenizer has no shipped default (a user names their model's); the data does.
    args = ["-m", "offline_rlhf.cli", "sft", f"run_dir={tmp_path / 'run'}", f"init.tokenizer={rm_tokenizer_dir}",
            "logging.progress=false"]
    result = run_in(project, args, env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    key = "data.sources[oasst1].path"  # the shipped data config's first source
    assert lines[0] == (
        f"orlhf sft: error: {key}: OpenAssistant/oasst1 is not in the Hugging Face cache ({hf_home / 'hub'}) and "
        "the hub cannot be reached (HF_HUB_OFFLINE=1); download it where there is network (hf download "
        f"OpenAssistant/oasst1 --repo-type dataset) into the same HF_HOME, or point {key} at a local copy")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    return offline_hub(monkeypatch, tmp_path / "hub")


def test_the_default_prompt_sources_and_label_inputs_name_each_missing_dataset_in_one_line(hub):
    sources = compose_stage("generate", GenerateConfig).sources
    label = compose_stage("label", LabelConfig)
    inputs = [i for i in label.inputs if i.kind != "generated"]
    reads = [(s.path, f"sources[{s.name}].path", lambda s=s: read_prompt_source(s, ChatTemplate())) for s in sources]
    reads += [(i.path, f"inputs[{i.name}].path", lambda i=i: read_inputs(replace(label, inputs=[i]), ChatTemplate()))
              for i in inputs]
    for path, key, read in reads:
        with pytest.raises(ConfigError) as err:
            read()
        assert str(err.value).startswith(f"{key}: {path} is not in the Hugging Face cache"), str(err.value)
        assert "\n" not in str(err.value) and str(err.value).endswith(f"or point {key} at a local copy")


def test_the_default_sources_read_their_hub_datasets_with_every_hub_option(hub, tmp_path):
    """The defaults, given the datasets in the cache as `hf download` leaves them: prompts of
    oasst1 as its export trees give them, and only hh-rlhf's data_dir folder is labeled."""
    dataset_repo(hub, tmp_path, "OpenAssistant/oasst1",
                 {"data/train-00000-of-00001.parquet": oasst_message_table(OASST_TREES)})
    helpful, harmless = jsonl_rows(HH_FILE, 12)[:8], jsonl_rows(HH_FILE, 12)[8:]
    dataset_repo(hub, tmp_path, "Anthropic/hh-rlhf", {"helpful-base/train.jsonl.gz": helpful,
                                                      "harmless-base/train.jsonl.gz": harmless})
    template = ChatTemplate()
    [oasst] = compose_stage("generate", GenerateConfig).sources
    assert read_prompt_source(oasst, template) == read_prompt_turns("sft", "oasst", str(OASST_TREES), template)
    [hh] = [i for i in compose_stage("label", LabelConfig).inputs if i.kind == "preference"]
    assert hh.data_dir == "helpful-base"
    samples = read_samples(hh.name, hh.kind, hh.format, hh.path, template, None, 0, **hub_options(hh, hh.kind))
    local = tmp_path / "helpful.jsonl"
    local.write_text("".join(json.dumps(row) + "\n" for row in helpful))
    assert len(samples) == 16 and samples == read_samples(hh.name, "preference", "hh_rlhf", str(local), template,
                                                          None, 0)


def test_prompt_sources_and_label_inputs_check_their_hub_options():
    with pytest.raises(ConfigError, match=r"^sources\[oasst1\]\.layout: unknown layout 'tree'; use one of auto, "):
        PromptSourceConfig(name="oasst1", kind="sft", format="hf", path="OpenAssistant/oasst1", layout="tree")
    with pytest.raises(ConfigError, match=r"^inputs\[hh\]\.layout: unknown layout 'tree'"):
        LabelInputConfig(name="hh", kind="preference", format="hf", path="Anthropic/hh-rlhf", layout="tree")
    with pytest.raises(ConfigError, match=r"^inputs\[gen\]\.format: generated samples are JSONL files"):
        LabelInputConfig(name="gen", kind="generated", format="hf", path="org/samples")
    source = LabelInputConfig(name="hh", kind="preference", format="hf", path="Anthropic/hh-rlhf", split="test",
                              data_dir="harmless-base", chosen_key="good")
    assert hub_options(source, "preference") == {"split": "test", "subset": "", "data_dir": "harmless-base",
                                                 "layout": "auto", "prompt_key": "prompt", "chosen_key": "good",
                                                 "rejected_key": "rejected"}


def test_the_default_eval_prompts_are_oasst1_validation_conversations(hub, tmp_path):
    """eval's held-out prompts by hub name: the validation split (SFT reads train)."""
    dataset_repo(hub, tmp_path, "OpenAssistant/oasst1",
                 {"data/validation-00000-of-00001.parquet": oasst_message_table(OASST_TREES)})
    cfg = compose_stage("eval", EvalConfig, ["models=[{name: sft, checkpoint: ckpts/sft}]"])
    assert (cfg.prompts, cfg.prompts_kind, cfg.prompts_split) == ("OpenAssistant/oasst1", "sft", "validation")
    prompts = held_out_prompts(cfg)
    assert prompts == read_prompt_turns("sft", "oasst", str(OASST_TREES), ChatTemplate())
    assert any(turns for _, turns in prompts)  # the multi-turn prompts keep their turns
