"""`--config-dir DIR`: a user's own configs (model/, data/, pipeline/, cluster/...) in a
folder of theirs, found by every stage and the launcher, so an install's conf/ is never edited."""

from __future__ import annotations

import pytest

from offline_rlhf.cli import main
from offline_rlhf.config.compose import CONF_DIR, compose_stage, split_config_dirs
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.tools import SmokeConfig

MODEL = "name: mine\nvocab_size: 512\ndim: 96\nn_layers: 3\nn_heads: 4\nn_kv_heads: 2\nffn_dim: 256\nmax_seq_len: 256\n"


def user_configs(root, files: dict[str, str]):
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return root


@pytest.fixture
def mine(tmp_path):
    return user_configs(tmp_path / "my_conf", {"model/mine.yaml": MODEL})


def test_a_model_in_the_users_folder_is_chosen_by_its_name(mine):
    folders, rest = split_config_dirs(["model=mine", "--config-dir", str(mine), "steps=2"])
    assert (folders, rest) == ([str(mine)], ["model=mine", "steps=2"])
    config = compose_stage("smoke", SmokeConfig, rest, folders)
    assert (config.model.name, config.model.dim, config.model.n_layers, config.steps) == ("mine", 96, 3, 2)


def test_the_cli_takes_both_spellings_and_prints_the_users_model(mine, capsys):
    for flag in (["--config-dir", str(mine)], [f"--config-dir={mine}"]):
        assert main(["smoke", *flag, "model=mine", "--cfg"]) == 0
        assert "name: mine\n  vocab_size: 512\n  dim: 96\n" in capsys.readouterr().out


def test_without_the_folder_the_model_is_unknown_and_with_it_it_is_listed(mine, capsys):
    assert main(["smoke", "model=mine", "--cfg"]) == 2
    assert "no config named 'model/mine'; available: 125m, 1b, 70b, 8b, demo, tiny" in capsys.readouterr().err
    assert main(["smoke", f"--config-dir={mine}", "model=other", "--cfg"]) == 2
    assert "available: 125m, 1b, 70b, 8b, demo, mine, tiny" in capsys.readouterr().err


def test_a_relative_folder_is_made_absolute(mine, monkeypatch):
    monkeypatch.chdir(mine.parent)
    assert split_config_dirs(["--config-dir", "my_conf"])[0] == [str(mine)]


def test_a_file_named_like_a_shipped_config_is_refused(tmp_path):
    """Hydra would take conf/'s silently: the user's edited copy would never be used."""
    folder = user_configs(tmp_path / "conf", {"model/tiny.yaml": MODEL})
    with pytest.raises(ConfigError) as info:
        split_config_dirs([f"--config-dir={folder}"])
    assert str(info.value) == (
        f"--config-dir: {folder}/model/tiny.yaml has the name of the shipped conf/model/tiny.yaml, which would be "
        "used instead; rename yours and choose it as model=<new name>")
    assert (CONF_DIR / "model" / "tiny.yaml").is_file()


def test_two_folders_may_not_hold_the_same_name(tmp_path, mine):
    second = user_configs(tmp_path / "other", {"model/mine.yaml": MODEL})
    with pytest.raises(ConfigError, match=f"{second}/model/mine.yaml has the name of {mine}/model/mine.yaml"):
        split_config_dirs(["--config-dir", str(mine), "--config-dir", str(second)])


@pytest.mark.parametrize("args,fragment", [
    (["--config-dir"], "--config-dir: needs a folder; write --config-dir DIR"),
    (["--config-dir=missing"], "--config-dir: missing is not a folder; pass the folder that holds your model/"),
    (["--config-dir=empty"], "--config-dir: empty holds no config: a config goes in a subfolder named after its "
                             "group (cluster, data, model, parallel, pipeline), e.g. model/my_model.yaml"),
    (["--config-dir=flat"], "--config-dir: flat holds no config"),  # a config beside, not in, a group folder
])
def test_a_folder_that_is_not_a_config_folder_is_one_line(tmp_path, monkeypatch, capsys, args, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    user_configs(tmp_path / "flat", {"mine.yaml": MODEL})
    assert main(["smoke", *args, "--cfg"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"orlhf smoke: error: {fragment}") and err.count("\n") == 1, err


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    folder = user_configs(tmp_path / "conf", {"model/broken.yaml": "name: broken\ndim: [1, 2\nn_layers: 2\n"})
    for flag in ("--cfg", "--help"):
        assert main(["smoke", f"--config-dir={folder}", "model=broken", flag]) == 2
        assert capsys.readouterr().err == (f"orlhf smoke: error: {folder}/model/broken.yaml:3: is not valid YAML "
                                           "(while parsing a flow sequence, expected ',' or ']', but got ':'); "
                                           "fix that file\n")


def test_a_folder_given_twice_counts_once(mine):
    assert split_config_dirs(["--config-dir", str(mine), f"--config-dir={mine}/../{mine.name}"])[0] == [str(mine)]


@pytest.mark.parametrize("relative,reason", [
    ("model/mine.yml", "Hydra reads .yaml files only"),
    ("stage/sft.yaml", "a stage's own config is not replaceable"),
])
def test_files_hydra_would_never_read_are_refused(tmp_path, relative, reason):
    folder = user_configs(tmp_path / "conf", {"data/mix.yaml": "sources: []\n", relative: MODEL})
    unread = folder / relative if relative.endswith(".yml") else folder / "stage"
    with pytest.raises(ConfigError, match=f"^--config-dir: {unread} would be ignored: {reason}"):
        split_config_dirs([f"--config-dir={folder}"])


def test_a_misspelt_option_is_named_not_taken_for_an_override(mine, capsys):
    assert main(["smoke", f"--confg-dir={mine}", "--cfg"]) == 2
    assert capsys.readouterr().err == (f"orlhf smoke: error: --confg-dir={mine}: unknown option; the options are "
                                       "--config-dir DIR, --cfg, --check and --help\n")
