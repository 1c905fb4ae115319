"""The public data staged under ../shared/data as stage overrides. The shipped configs name
these sets by Hugging Face hub id (conf/data/sft_public.yaml, hh_rlhf.yaml and the prompt
sources of generate, label and ppo); tests read local copies of them instead, always by an
explicit override, never through a shipped default."""

from __future__ import annotations

from tests.fixtures import SHARED_DATA

SELF_INSTRUCT = SHARED_DATA / "self-instruct" / "data" / "seed_tasks.jsonl"
OASST_TREES = SHARED_DATA / "open-assistant" / "model_eval_manual_data" / "en_100_tree.jsonl"
HH_HARMLESS = SHARED_DATA / "hh-rlhf" / "harmless-base" / "test-dev.jsonl"

# `data.sources` of `orlhf sft` and `orlhf rm`.
SFT_DATA = (f"data.sources=[{{name: oasst, format: oasst, path: '{OASST_TREES}'}}, "
            f"{{name: self_instruct, format: self_instruct, path: '{SELF_INSTRUCT}'}}]")
PREFERENCE_DATA = f"data.sources=[{{name: hh_harmless, format: hh_rlhf, path: '{HH_HARMLESS}'}}]"


def prompt_sources(kind: str = "sft", format: str = "oasst", path=OASST_TREES) -> str:
    """`sources` of `orlhf generate` and `orlhf ppo`: one local prompt source."""
    return f"sources=[{{name: {format}, kind: {kind}, format: {format}, path: '{path}'}}]"


def jsonl_data(name: str, path) -> str:
    """`data.sources` of `orlhf sft` or `orlhf rm` as one JSONL file, replacing every default source."""
    return f"data.sources=[{{name: {name}, format: jsonl, path: '{path}'}}]"
