"""Compose a stage config from `conf/` with Hydra and turn it into a typed dataclass.

Only the entry point sees Hydra/OmegaConf; everything below receives dataclasses.
Every failure is turned into a one-line `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Sequence, TypeVar

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Quote, QuotedString
from hydra.errors import HydraException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from offline_rlhf.config.base import freeze, require_finite, settable_fields
from offline_rlhf.config.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parents[1]
# The shipped configs: conf/ at the repository's root, reached through the package's `conf`
# link, which a wheel turns into a copy (pyproject.toml's package data): `pip install .`
# finds them in the package.
CONF_DIR = PACKAGE_DIR / "conf"
CONFIG_DIR_FLAG = "--config-dir"
STAGES_GROUP = "stage"  # conf/stage/<stage>.yaml: one per stage, naming its schema; not a group users add to
T = TypeVar("T")

# `${repo:../shared/data/x.jsonl}` in a config: a path relative to the repository root, so
# configs in tests work from any working directory (and on every node of a cluster job).
OmegaConf.register_new_resolver("repo", lambda relative: str((PACKAGE_DIR.parent / relative).resolve()),
                                replace=True)


def register_stage(stage: str, schema: type) -> None:
    """Make `conf/stage/<stage>.yaml` able to name `<stage>_schema` in its defaults."""
    ConfigStore.instance().store(name=f"{stage}_schema", node=schema)


def split_config_dirs(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """`--config-dir DIR` or `--config-dir=DIR`, any number of times: folders of the user's
    own configs (model/, data/, pipeline/... as in conf/), searched after the shipped ones.
    Returns the folders, absolute, and the other arguments."""
    folders, rest, args = [], [], iter(args)
    for arg in args:
        if arg == CONFIG_DIR_FLAG or arg.startswith(CONFIG_DIR_FLAG + "="):
            value = arg.split("=", 1)[1] if "=" in arg else next(args, "")
            if str(Path(value).expanduser().resolve()) not in folders:  # a folder given twice counts once
                folders.append(_config_dir(value, [CONF_DIR, *map(Path, folders)]))
        else:
            rest.append(arg)
    return folders, rest


def _config_dir(value: str, earlier: list[Path]) -> str:
    """A folder holding configs of conf/'s groups (`model/my_model.yaml`), none named like
    one of an `earlier` folder (ambiguous: Hydra would take the earlier one), absolute: the
    launcher passes it on to stages started elsewhere."""
    if not value or value.startswith("-"):  # `--config-dir --cfg`: the folder left out
        raise ConfigError(CONFIG_DIR_FLAG, "needs a folder", f"write {CONFIG_DIR_FLAG} DIR")
    folder = Path(value).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(CONFIG_DIR_FLAG, f"{value} is not a folder", "pass the folder that holds your model/, "
                          "data/, pipeline/... subfolders")
    configs = sorted(path.relative_to(folder) for path in folder.glob("*/**/*.yaml"))
    groups = sorted(path.name for path in CONF_DIR.iterdir() if path.is_dir() and path.name != STAGES_GROUP)
    if not configs:
        raise ConfigError(CONFIG_DIR_FLAG, f"{value} holds no config: a config goes in a subfolder named after its "
                          f"group ({', '.join(groups)}), e.g. model/my_model.yaml, and is chosen as model=my_model")
    unread = next(folder.glob("*/**/*.yml"), None) or (folder / STAGES_GROUP if (folder / STAGES_GROUP).is_dir()
                                                         else None)
    if unread is not None:
        raise ConfigError(CONFIG_DIR_FLAG, f"{unread} would be ignored: " + (
            "Hydra reads .yaml files only" if unread.suffix == ".yml" else
            "a stage's own config is not replaceable (set its keys on the command line or in a pipeline entry's "
            "overrides)"), "rename or move it")
    for config in configs:
        other = next((root for root in earlier if (root / config).exists()), None)
        if other is not None:
            what = f"the shipped conf/{config}" if other == CONF_DIR else str(other / config)
            raise ConfigError(CONFIG_DIR_FLAG, f"{folder / config} has the name of {what}, which would be used "
                              f"instead", f"rename yours and choose it as {config.parent.as_posix()}=<new name>")
    return str(folder)


def search_path(config_dirs: Sequence[str]) -> list[str]:
    """The override that has Hydra search the user's config folders after conf/ (Hydra's own
    `hydra.searchpath`): their `model/my_model.yaml` is `model=my_model` (`_config_dir` refuses
    a name conf/ has too)."""
    if not config_dirs:
        return []
    folders = ", ".join(QuotedString(text=f"file://{folder}", quote=Quote.single).with_quotes()
                        for folder in config_dirs)
    return [f"hydra.searchpath=[{folders}]"]


def compose_stage(stage: str, schema: type[T], overrides: Sequence[str] = (), config_dirs: Sequence[str] = ()) -> T:
    """Compose `conf/stage/<stage>.yaml` with `overrides` into a validated, frozen instance of
    `schema`; the user's `config_dirs` (`split_config_dirs`) are searched too."""
    register_stage(stage, schema)
    _reject_new_keys(overrides)
    overrides = _into_dicts(schema, overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name=f"stage/{stage}", overrides=[*search_path(config_dirs), *overrides])
        OmegaConf.set_struct(cfg, True)
        return freeze(require_finite(OmegaConf.to_object(cfg)))
    except ConfigError:
        raise
    except yaml.YAMLError as err:
        raise _not_yaml(err) from None
    except (HydraException, OmegaConfBaseException) as err:
        raise _one_line_error(err, schema, overrides) from None
    except (AttributeError, AssertionError) as err:  # omegaconf merging an override into a null sub-config
        raise _null_sub_config(err, overrides) from None


def _null_sub_config(err: Exception, overrides: Sequence[str]) -> ConfigError:
    """omegaconf cannot merge a command-line override into a sub-config that is null by
    default (`model.rope_scaling`); it fails with a bare AttributeError or AssertionError."""
    return ConfigError(getattr(err, "full_key", None) or "overrides",
                       "an override of a sub-config that is null by default (such as model.rope_scaling) cannot be "
                       "applied from the command line",
                       "set it in a YAML file of its group (e.g. a renamed copy of conf/model/8b.yaml with "
                       "`rope_scaling: {factor: 8.0, ...}` in DIR/model/, passed as --config-dir DIR model=<name>)")


def composed_defaults(stage: str, schema: type, overrides: Sequence[str] = (), config_dirs: Sequence[str] = ()) -> dict:
    """The stage's YAML merged into the schema, unvalidated and unresolved (`???` where a
    value is required): what `--help` shows. Falls back to the schema's own defaults when
    the overrides do not compose."""
    register_stage(stage, schema)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name=f"stage/{stage}",
                          overrides=[*search_path(config_dirs), *_into_dicts(schema, overrides)])
    except yaml.YAMLError as err:
        raise _not_yaml(err) from None
    except (HydraException, OmegaConfBaseException):
        cfg = OmegaConf.structured(schema)
    return OmegaConf.to_container(cfg, resolve=False)


def _not_yaml(err: yaml.YAMLError) -> ConfigError:
    """A config file the YAML parser refuses: where (file:line) and why, in one line."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"{mark.name}:{mark.line + 1}" if mark is not None else "config"
    reason = ", ".join(filter(None, (getattr(err, "context", None), getattr(err, "problem", None))))
    return ConfigError(where, f"is not valid YAML ({reason or str(err).splitlines()[0]})", "fix that file")


def _reject_new_keys(overrides: Sequence[str]) -> None:
    """`+key=value` would add a key the schema does not have (and it would be dropped
    silently); only `+group=option` for a config group under conf/ is allowed."""
    for override in overrides:
        if override.startswith("+"):
            key = override.lstrip("+").split("=", 1)[0]
            if not (CONF_DIR / key).is_dir():
                raise ConfigError(key, "unknown key (cannot be added with '+')",
                                  "check the spelling; `--cfg` prints the valid keys")


def _into_dicts(schema: type, overrides: Sequence[str]) -> list[str]:
    """Overrides of a dict-typed field or of a key inside one (`data.template.kwargs.enable_thinking=false`)
    as Hydra's `++key=value` (add or override): the dict's keys are the user's, not the schema's,
    and struct mode would refuse every new one."""
    return [f"++{override}" if _in_dict_field(schema, override.split("=", 1)[0]) else override
            for override in overrides]


def _in_dict_field(schema: type, key: str) -> bool:
    kind = schema
    for part in key.split("."):
        if not dataclasses.is_dataclass(kind) or (kind := settable_fields(kind).get(part)) is None:
            return False
        if dict in (kind, typing.get_origin(kind)):
            return True
    return False


def to_yaml(config) -> str:
    """The resolved config as YAML, written beside every stage's outputs."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def _overridden_list(chain: list[Exception], overrides: Sequence[str]) -> tuple[str, list] | None:
    """The key and items of the list override Hydra could not apply (`inputs=[{...}]`), if it
    was one."""
    outer = next((m.group(1) for c in chain if (m := re.match(r"Could not override '([^']+)'", str(c)))), None)
    override = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == outer), None)
    if override is None:
        return None
    try:
        value = OverridesParser.create().parse_override(override.lstrip("+~")).value()
    except HydraException:
        return None
    return (outer, value) if isinstance(value, list) else None


def _list_item_key(outer: str, items: list, key: str, item_type: str, schema: type | None) -> tuple[str, str | None]:
    """`outer[i].key` for the first item of the overridden list that sets `key`, and the
    field of the item's dataclass (named `item_type`) it most likely meant."""
    position = next((i for i, item in enumerate(items) if isinstance(item, dict) and key in item), None)
    where = f"{outer}[{position}].{key}" if position is not None else f"{outer}[].{key}"
    fields = next((dotted_keys(kind) for kind in _item_types(schema) if kind.__name__ == item_type), [])
    near = difflib.get_close_matches(key, fields, n=1, cutoff=0.75)
    return where, f"{where.rsplit('.', 1)[0]}.{near[0]}" if near else None


def _item_types(schema: type | None) -> list[type]:
    """The dataclasses that lists in `schema` (and its nested configs) hold."""
    found = []
    for kind in settable_fields(schema).values() if schema is not None else ():
        if dataclasses.is_dataclass(kind):
            found += _item_types(kind)
        elif typing.get_origin(kind) is list and dataclasses.is_dataclass(item := typing.get_args(kind)[0]):
            found += [item, *_item_types(item)]
    return found


def _causes(err: BaseException):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def dotted_keys(schema: type, prefix: str = "") -> list[str]:
    """Every settable key of a config dataclass, nested configs as `a.b` (lists not expanded)."""
    keys = []
    for name, kind in settable_fields(schema).items():
        if dataclasses.is_dataclass(kind):
            keys += dotted_keys(kind, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def closest_key(key: str, keys: Sequence[str]) -> str | None:
    """The key a misspelt or unqualified one most likely meant: the same last part under
    another parent (`lr` -> `optim.lr`), else the nearest spelling (`optim.lrr` -> `optim.lr`)."""
    last = key.rsplit(".", 1)[-1]
    same_name = [k for k in keys if k.rsplit(".", 1)[-1] == last and k != key]
    if len(same_name) == 1:
        return same_name[0]
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    return near[0] if near else None


def _unparsed_override(err: OverrideParseException, schema: type | None) -> ConfigError:
    """An override Hydra's grammar refuses (`=`, `#`, `;`, spaces... in an unquoted value):
    the key, Hydra's reason, and how to quote the value, as the user wrote it (without the
    `++` that `_into_dicts` put before a dict field's override)."""
    override = err.override
    if schema is not None and _in_dict_field(schema, override.removeprefix("++").partition("=")[0].strip()):
        override = override.removeprefix("++")
    key, _, value = override.partition("=")
    key = key.strip()
    reason = next((line.strip() for line in err.message.splitlines() if line.strip()), "")
    if reason.startswith("LexerNoViableAltException"):
        reason = "a character Hydra's grammar does not take here"
    if not re.fullmatch(r"[+~]*[\w.\[\]/@-]+", key):
        return ConfigError("config", f"cannot parse {override!r}: {reason}", "write it as key=value")
    if "\n" in value:  # a quoted argument that spans lines in a shell: the line break is in the value
        return ConfigError(key, "the value holds a line break", "write it on one line (or end each line with a "
                           "backslash inside double quotes)")
    if value.startswith(("[", "{")) or "'" in value:  # a list, a dict or quotes: which part to quote is theirs
        quote = f"each string in the value, e.g. {key}=['a=b']"
    else:
        quote = f"the value: {key}='{value}'"
    return ConfigError(key, f"cannot parse {override!r}: {reason}",
                       f"quote {quote} (in a shell, wrap the whole argument in double quotes)")


def _one_line_error(err: Exception, schema: type | None = None, overrides: Sequence[str] = ()) -> ConfigError:
    """Hydra/OmegaConf messages are multi-line; keep the key and the reason."""
    chain = list(_causes(err))
    for cause in chain:
        if isinstance(cause, ConfigError):
            return cause
    unparsed = next((c for c in chain if isinstance(c, OverrideParseException)), None)
    if unparsed is not None:
        return _unparsed_override(unparsed, schema)
    keyed = next((c for c in chain if getattr(c, "full_key", None)), chain[-1])
    text = str(keyed).strip()
    missing = re.search(r"Key '([^']+)' not in '([^']+)'", text)
    if missing:
        key = keyed.full_key or missing.group(1)
        suggestion = closest_key(key, dotted_keys(schema)) if schema is not None else None
        listed = _overridden_list(chain, overrides)
        if listed is not None and "." not in key:  # omegaconf names a list item's key alone
            key, suggestion = _list_item_key(*listed, key, missing.group(2), schema)
        hint = f"did you mean {suggestion}?" if suggestion else "check the spelling;"
        return ConfigError(key, f"unknown key (not a field of {missing.group(2)})",
                           f"{hint} `--cfg` prints the valid keys")
    no_option = re.search(r"Could not find '([^']+)'", text)
    if no_option:
        options = re.findall(r"^\s+(\S+)$", text, flags=re.M)
        hint = f"available: {', '.join(options)}" if options else "see conf/ for the options"
        return ConfigError(no_option.group(1).split("/")[0], f"no config named {no_option.group(1)!r}", hint)
    return ConfigError(getattr(keyed, "full_key", None) or "config", text.splitlines()[0])
