"""Compose `LaunchConfig` from `conf/pipeline/` and `conf/cluster/` with Hydra's compose API.

Hydra and OmegaConf report problems in several lines; every failure here becomes one
`LaunchError` line naming the key.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Sequence

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.types import Quote, QuotedString
from hydra.errors import HydraException, OverrideParseException
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launcher.schema import CONF_DIR, LaunchConfig, LaunchError

CONFIG_NAME = "orlhf_launch"
# The schema first, so the selected pipeline and cluster files are merged into it (typed).
DEFAULTS = ["launch_schema", {"pipeline": MISSING}, {"cluster": "local"}]
RUN_DIR_REFERENCE = "${run_dir}"
# Free-form mappings: `+cluster.env.NAME=value` adds a variable, `+pipeline.seed_keys.STAGE=[key]` a stage kind.
ADDABLE_PREFIXES = ("cluster.env.", "pipeline.seed_keys.")


def compose_launch(overrides: Sequence[str], config_dirs: Sequence[str] = ()) -> LaunchConfig:
    """`config_dirs`: the user's config folders, searched after conf/ (as the stages search
    them; offline_rlhf.config.compose.search_path)."""
    store = ConfigStore.instance()
    store.store(name="launch_schema", node=LaunchConfig)
    store.store(name=CONFIG_NAME, node={"defaults": DEFAULTS})
    _reject_added_keys(overrides)
    searched = ", ".join(QuotedString(text=f"file://{folder}", quote=Quote.single).with_quotes()
                         for folder in config_dirs)
    search = [f"hydra.searchpath=[{searched}]"] if config_dirs else []
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name=CONFIG_NAME, overrides=[*search, *overrides])
        _leave_run_dir_to_the_stages(cfg)
        return OmegaConf.to_object(cfg)
    except LaunchError:
        raise
    except yaml.YAMLError as err:  # a pipeline or cluster file: where and why, in one line
        mark = getattr(err, "problem_mark", None)
        raise LaunchError(f"{mark.name}:{mark.line + 1}" if mark else "config",
                          f"is not valid YAML ({getattr(err, 'problem', None) or _first_line(str(err))})",
                          "fix that file") from None
    except (HydraException, OmegaConfBaseException) as err:
        raise _one_line(err, config_dirs) from None


def _leave_run_dir_to_the_stages(cfg) -> None:
    """`${run_dir}` in a stage's overrides stays for the stage to resolve against the run_dir
    it is given: pasted in as text, a comma, space or quote in the path would change how
    Hydra splits the override (`init.tokenizer=${run_dir}/tok` would become a sweep)."""
    for stage in cfg.pipeline.stages:
        raw = OmegaConf.to_container(stage.overrides, resolve=False)
        stage.overrides = [override.replace(RUN_DIR_REFERENCE, "\\" + RUN_DIR_REFERENCE) for override in raw]


def _reject_added_keys(overrides: Sequence[str]) -> None:
    """`+key=value` would add a key no dataclass declares; the schema is the whole truth."""
    for override in overrides:
        key = override.lstrip("+").split("=", 1)[0]
        if override.startswith("+") and not key.startswith(ADDABLE_PREFIXES):
            raise LaunchError(key, "keys cannot be added with '+'", "set an existing key: key=value")


def _causes(err: BaseException):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def _one_line(err: Exception, config_dirs: Sequence[str]) -> LaunchError:
    if isinstance(err, OverrideParseException):
        return LaunchError("command line", f"cannot parse an override: {_first_line(str(err))}",
                           _quoting_hint(err.override))
    chain = list(_causes(err))
    launch_error = next((c for c in chain if isinstance(c, LaunchError)), None)
    if launch_error is not None:  # raised by a __post_init__ while converting
        return launch_error
    keyed = next((c for c in chain if getattr(c, "full_key", None)), chain[-1])
    text = str(keyed).strip()
    if re.search(r"Key '[^']+' (not in|is not in struct)", text) and getattr(keyed, "full_key", None):
        return LaunchError(keyed.full_key, "unknown key", "check the spelling; see launcher/schema.py for the keys")
    if "issing mandatory value" in text and "pipeline.name" in f"{text} {getattr(keyed, 'full_key', '')}":
        return LaunchError("pipeline.name", "is not set", "add `name: <name>` to the pipeline's file (the run's "
                           "default folder is runs/<name>)")
    if "You must specify" in text:
        group = re.search(r"You must specify '([^']+)'", text).group(1)
        return LaunchError(group, "required", f"choose one of: {', '.join(_options(group, config_dirs))}")
    sweep = re.search(r"Ambiguous value for argument '([^=']+)=", text)
    if sweep:  # Hydra reads an unquoted `a,b` as a sweep over two values
        key = sweep.group(1)
        return LaunchError(key, "a ',' outside quotes makes a list of values", f"quote the value: \"{key}='a,b'\"")
    missing_option = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if missing_option:
        group, option = missing_option.groups()
        return LaunchError(group, f"no config named {option!r}",
                           f"choose one of: {', '.join(_options(group, config_dirs))}")
    return LaunchError(getattr(keyed, "full_key", None) or "config", _first_line(text))


def _quoting_hint(override: str) -> str:
    """Which character Hydra's grammar refuses unquoted, and the override with its whole value
    quoted; a list or mapping quotes its items instead."""
    key, _, value = override.partition("=")
    if value[:1] in ("[", "{"):
        return "quote list items that contain '=' or other special characters: key=['a=b']"
    bad = re.search(r"[^\w\s/\\+.$%*@?|:,-]", re.sub(r"\$\{[^}]*\}", "", value))
    if not key or bad is None:
        return "write key=value"
    quote = "'" if '"' in value else '"'
    hydra = f"{key}={quote}{value}{quote}"
    return f"{bad.group()!r} needs quotes: quote the whole value, {shlex.quote(hydra)}"  # one shell word


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "invalid"


def _options(group: str, config_dirs: Sequence[str]) -> list[str]:
    return sorted({path.stem for folder in (CONF_DIR, *config_dirs) for path in (Path(folder) / group).glob("*.yaml")})
