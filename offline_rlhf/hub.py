"""Hugging Face hub names for models, tokenizers and datasets (no torch here).

A value such as `init.checkpoint`, `init.tokenizer`, `hf_dir` or a data source's `path`
is either a local path or a hub repo id, optionally pinned: `org/name@revision`. The rule
(`parse_repo_id`): a path that exists locally is always local; otherwise the value is a
repo id when it has the `org/name` shape (exactly one `/`, neither part starting with `.`,
only letters, digits, `-`, `_` and `.`); anything else is a local path. Write `./org/name`
to force a local path that does not exist yet. A pinned revision is a git name: `/`-separated
parts, none empty or starting with `.`, and no `..`; another is an error, since
huggingface_hub joins it to its cache folder as a path.

Repo ids resolve through `huggingface_hub` (imported only when one is resolved) and so
follow its environment: the cache under `HF_HOME` / `HF_HUB_CACHE`, `HF_TOKEN` for private
or gated repos, and `HF_HUB_OFFLINE=1`, which serves what the cache holds and fails fast
otherwise. Every failure is one `ConfigError` line saying how to fix it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from offline_rlhf.config.errors import ConfigError

# What a model import reads (models.hf): weights as safetensors only, never pickles.
# chat_template.jinja: where transformers >= 4.50 saves a chat template (not in tokenizer_config.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")
MODEL_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES)

_PART = r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*"
_REPO_ID = re.compile(rf"(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[A-Za-z0-9_.\-/]+))?")


@dataclass(frozen=True)
class RepoRef:
    repo_id: str  # org/name
    revision: str | None = None  # branch, tag or commit; None: the repo's default branch

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"

    @property
    def folder_name(self) -> str:
        """A file-system-safe name: `org--name`, plus `--revision` when pinned."""
        name = str(self).replace("/", "--").replace("@", "--")
        return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def parse_repo_id(value: str, key: str = "") -> RepoRef | None:
    """The hub repo `value` names, or None when it is a local path (see the module doc).
    `key` names the config key in errors (the value itself when not given)."""
    if not value or os.path.exists(value):
        return None
    match = _REPO_ID.fullmatch(value)
    if match is None or match["repo"].endswith(".") or ".." in match["repo"]:
        return None
    ref = RepoRef(match["repo"], match["revision"])
    check_revision(ref, key or value)
    return ref


def check_revision(ref: RepoRef, key: str) -> None:
    """Refuse a revision that is no git branch, tag or commit name: huggingface_hub reads and
    writes `refs/<revision>` in its cache, so `../..` or a leading `/` would leave the cache."""
    revision = ref.revision
    if revision and (".." in revision or any(not p or p.startswith(".") for p in revision.split("/"))):
        raise ConfigError(key, f"revision {revision!r} of {ref.repo_id} is no branch, tag or commit name (it holds "
                          "'..', or a '/'-separated part that is empty or starts with '.')",
                          "pin an existing branch, tag or commit after '@'")


def resolve_dir(value: str, key: str, patterns: tuple[str, ...] = MODEL_FILES, repo_type: str = "model") -> Path:
    """`value` as a local folder: the path itself, or the hub snapshot of the repo it names
    (only the files matching `patterns` are fetched). `key` names the config key in errors."""
    ref = parse_repo_id(value, key)
    return Path(value) if ref is None else snapshot(ref, key, patterns, repo_type)


def snapshot(ref: RepoRef, key: str, patterns: tuple[str, ...] | None = MODEL_FILES, repo_type: str = "model",
             local_only: bool = False) -> Path:
    """The local snapshot folder of `ref` from the hub cache, downloading what is missing
    unless offline (`HF_HUB_OFFLINE=1`) or `local_only`."""
    check_revision(ref, key)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise ConfigError(key, f"{ref} is a Hugging Face hub name, and huggingface_hub is not installed",
                          "pip install huggingface_hub, or pass a local path") from None
    try:
        return Path(snapshot_download(ref.repo_id, revision=ref.revision, repo_type=repo_type,
                                      allow_patterns=list(patterns) if patterns else None,
                                      local_files_only=local_only))
    except GatedRepoError:  # before RepositoryNotFoundError: it is a subclass
        raise ConfigError(key, f"{ref} is a gated repo on the Hugging Face hub",
                          "accept its terms on the hub and set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise ConfigError(key, f"{ref}: no revision {ref.revision!r} on the Hugging Face hub",
                          "pin an existing branch, tag or commit after '@'") from None
    except RepositoryNotFoundError:
        raise ConfigError(key, f"{ref} was not found on the Hugging Face hub (or is private)",
                          "check the name, set HF_TOKEN for a private repo, or pass a local path") from None
    except LocalEntryNotFoundError:
        raise unreachable(ref, key, repo_type) from None


def unreachable(ref: RepoRef, key: str, repo_type: str = "model") -> ConfigError:
    """The one line for a repo that is neither in the local cache nor reachable."""
    flag = " --repo-type dataset" if repo_type == "dataset" else ""
    revision = f" --revision {ref.revision}" if ref.revision else ""
    return ConfigError(key, f"{ref} is not in the Hugging Face cache ({hub_cache()}) and the hub cannot be reached"
                            f"{' (HF_HUB_OFFLINE=1)' if offline() else ''}",
                       f"download it where there is network (hf download {ref.repo_id}{flag}{revision}) into the "
                       f"same HF_HOME, or point {key} at a local copy")


def hub_cache() -> str:
    """The folder huggingface_hub caches repos in (it reads the environment at import)."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
