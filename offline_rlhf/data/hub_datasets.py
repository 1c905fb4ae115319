"""Datasets read through Hugging Face `datasets` (the `hub` install extra), for `format: hf`
sources. `path` is a local dataset folder or one parquet/JSON/JSONL/CSV file when it
exists, else a hub dataset id `org/name[@revision]`. This module loads a split and names
its rows; the readers of each layout parse them with the same code as files.

A hub dataset is loaded as `datasets` does it (its own cache, `HF_DATASETS_CACHE`,
downloading when online, `HF_TOKEN`). When the hub cannot be reached (`HF_HUB_OFFLINE=1`
or no network), a copy in the Hugging Face hub cache, as `hf download --repo-type dataset
org/name` leaves it, is loaded instead; with neither, the error is one line saying how to
fix it. (`offline_rlhf.hub` resolves models; it sits beside `data` in the layer table, so
this module talks to huggingface_hub itself.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import HF_PREFERENCE_LAYOUTS, HF_SFT_LAYOUTS
from offline_rlhf.data.errors import DataError, Location
from offline_rlhf.hub import RepoRef, parse_repo_id, snapshot

# The source config keys that only `format: hf` reads, and the column names each family's
# hf reader takes (passed to the readers as keyword arguments by `hub_options`).
HUB_OPTIONS = ("split", "subset", "data_dir", "layout")
COLUMN_KEYS = {"sft": ("prompt_key", "response_key", "messages_key"),
               "preference": ("prompt_key", "chosen_key", "rejected_key"),
               "prompts": ("prompt_key",)}
# `datasets` builders for single files, by suffix (compressed `.jsonl.gz` reads as JSON too).
FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}
OASST_COLUMNS = {"message_id", "parent_id", "role", "text"}
DOLLY_COLUMNS = {"instruction", "context", "response"}


@dataclass
class HubRows:
    """One loaded split: `name` (`org/name[subset]:split`) locates its rows in messages."""

    name: str
    columns: list[str]
    dataset: Any  # a datasets.Dataset

    def records(self) -> Iterator[tuple[Location, dict[str, Any]]]:
        """(location, row) with 1-based row numbers, as file readers number lines."""
        for number, row in enumerate(self.dataset, start=1):
            yield Location(self.name, number), row

    def first(self) -> dict[str, Any]:
        return self.dataset[0]  # load_split refuses an empty split


def hub_options(source, family: str) -> dict[str, str]:
    """The keyword arguments of `family`'s (sft, preference, prompts) `format: hf` reader
    that a source config carries: hub options and column names; none for other formats.
    A key the config lacks keeps the reader's default."""
    if source.format != "hf":
        return {}
    return {key: getattr(source, key) for key in HUB_OPTIONS + COLUMN_KEYS[family] if hasattr(source, key)}


def source_key(source, prefix: str) -> dict[str, str]:
    """For a `format: hf` source config: the config key of its path (`{prefix}[name].path`),
    which the hub readers name in their errors; nothing for other formats."""
    return {"key": f"{prefix}[{source.name or source.path}].path"} if source.format == "hf" else {}


def load_split(path: str, split: str = "train", subset: str = "", data_dir: str = "", key: str = "path") -> HubRows:
    """A split of the dataset at `path` (config key `key`, named by its errors): a hub
    dataset id, or a local folder or file."""
    datasets = _import_datasets(path)
    kwargs = {"name": subset or None, "data_dir": data_dir or None, "split": split}
    name = f"{path}[{subset}]:{split}" if subset else f"{path}:{split}"
    try:
        dataset = _load_local(datasets, path, kwargs) if _is_local(path) else _load_hub(datasets, path, kwargs, key)
    except (ConfigError, DataError):
        raise
    except ValueError as err:  # an unknown split, subset or data_dir
        raise DataError(name, None, f"expected a split and subset the dataset has ({_first_line(err)})") from None
    except datasets.exceptions.DatasetBuildError as err:  # unreadable files, or files of different columns
        raise DataError(name, None, f"expected files that datasets can read ({_first_line(err.__cause__ or err)})"
                        ) from None
    if len(dataset) == 0:
        raise DataError(name, None, "expected at least one record (no records)")
    return HubRows(name, list(dataset.column_names), dataset)


def _import_datasets(path: str):
    try:
        import datasets
    except ImportError:
        raise ConfigError("format", f"hf (for {path}) reads datasets with the `datasets` package, which is not "
                          "installed", "pip install 'offline-rlhf[hub]' (or datasets), or convert it to JSONL "
                          "and use format: jsonl") from None
    return datasets


def _is_local(path: str) -> bool:
    """An existing path, or one that names a file or folder and no hub id (a file suffix,
    a leading `/`, `.` or `~`): that one is reported missing, not looked up on the hub."""
    return Path(path).exists() or path.startswith(("/", ".", "~")) or _builder(path) is not None


def _builder(path: str) -> str | None:
    return FILE_BUILDERS.get(next((s for s in Path(path).suffixes if s in FILE_BUILDERS), ""))


def _load_local(datasets, path: str, kwargs: dict):
    local = Path(path)
    if local.is_dir():
        return datasets.load_dataset(str(local), **kwargs)
    builder = _builder(path)
    if not local.is_file() or builder is None:
        raise DataError(path, None, "expected a hub dataset id (org/name), a dataset folder, or a "
                                    f"{'/'.join(sorted(FILE_BUILDERS))} file (relative paths start from the "
                                    "current directory)")
    return datasets.load_dataset(builder, data_files=str(local), **kwargs)


def _load_hub(datasets, path: str, kwargs: dict, key: str):
    ref = parse_repo_id(path, key) or RepoRef(*path.partition("@")[::2])
    try:
        return datasets.load_dataset(ref.repo_id, revision=ref.revision or None, **kwargs)
    except ConnectionError:  # offline or unreachable, and not in the datasets cache: try the hub cache
        return datasets.load_dataset(str(snapshot(ref, key, None, "dataset", local_only=True)), **kwargs)
    except FileNotFoundError:  # datasets' DatasetNotFoundError
        raise ConfigError(key, f"{path} was not found on the Hugging Face hub (or is private or gated)",
                          "check the name, set HF_TOKEN for a private or gated dataset, or pass a local copy") from None


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def detect_layout(rows: HubRows, family: str, layout: str = "auto", prompt_key: str = "prompt",
                  response_key: str = "response", chosen_key: str = "chosen", rejected_key: str = "rejected",
                  messages_key: str = "messages") -> str:
    """The layout to parse `rows` with: `layout` itself unless `auto`, else from the columns.
    SFT: oasst (a message table), messages (messages_key), dolly (instruction, context,
    response), columns (prompt_key, response_key). Preference: oasst; with chosen/rejected
    columns, messages when they hold conversations (UltraFeedback binarized), columns when
    there is a prompt column, hh_rlhf (whole transcripts) otherwise."""
    allowed = HF_SFT_LAYOUTS if family == "sft" else HF_PREFERENCE_LAYOUTS
    if layout in allowed:
        return layout
    if layout != "auto":
        raise ConfigError("layout", f"{layout!r} is not a layout of {family} data",
                          f"use auto or one of {', '.join(allowed)}")
    columns = set(rows.columns)
    if OASST_COLUMNS <= columns:
        return "oasst"
    if family == "sft":
        for found, needed in (("messages", {messages_key}), ("dolly", DOLLY_COLUMNS),
                              ("columns", {prompt_key, response_key})):
            if needed <= columns:
                return found
    elif {chosen_key, rejected_key} <= columns:
        if isinstance(rows.first()[chosen_key], list):
            return "messages"
        return "columns" if prompt_key in columns else "hh_rlhf"
    raise ConfigError("layout", f"cannot tell how to read {rows.name} as {family} data from its columns "
                      f"{sorted(columns)}", "set layout (and the *_key column names) on the source")
