"""Config of `orlhf judge`: a judge model behind an OpenAI-compatible endpoint grades
answer files (FastChat's MT-bench formats or `orlhf eval`'s)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from offline_rlhf.config.base import (
    WEEK_S,
    Frozen,
    require,
    require_at_most,
    require_positive,
    require_run_dir,
    require_seed,
)
from offline_rlhf.config.errors import ConfigError

FORMATS = ("single", "pairwise", "paper")
MAX_RETRIES = 100  # per request
PAPER_MAX_MODELS = 26  # the paper format names its assistants A..Z
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class JudgeAnswersConfig(Frozen):
    """One model's answers: FastChat's answer format (`question_id`, `choices[0].turns`) or
    the `answers_<model>.jsonl` that `orlhf eval` writes (`prompt`, `response`)."""

    model: str = ""
    path: str = ""


@dataclass
class JudgeEndpointConfig(Frozen):
    """The judge: `POST {base_url}/chat/completions` of any OpenAI-compatible server (vLLM,
    TGI, OpenAI, `orlhf serve`). The API key is read from the environment variable named by
    `api_key_env` and sent as a Bearer token; it is never written to configs or logs."""

    base_url: str = ""  # e.g. http://127.0.0.1:8000/v1 or https://api.openai.com/v1
    model: str = ""  # the judge model's name at that endpoint (recorded in every judgment)
    api_key_env: str = ""  # name of the variable holding the key; "" sends no key
    temperature: float = 0.0  # the judge's sampling temperature (0: deterministic)
    max_tokens: int = 2048  # longest judgment
    concurrency: int = 4  # requests in flight at once
    timeout_s: float = 120.0  # one request, from connecting to its reply's last byte; a timeout is retried
    max_retries: int = 6  # per request, on HTTP 429, 5xx, timeouts and failed connections
    backoff_s: float = 2.0  # first retry delay, doubled on each further retry (or the server's Retry-After)

    def check(self) -> None:
        """Run by JudgeConfig: a nested config is also built with its (empty) defaults."""
        require(self, "base_url", "model", prefix="judge.")
        check_base_url(self.base_url)
        if self.api_key_env and not _ENV_NAME.fullmatch(self.api_key_env):
            raise ConfigError("judge.api_key_env", f"{self.api_key_env!r} is not an environment variable name",
                              "name the variable that holds the key (e.g. OPENAI_API_KEY), not the key itself")
        require_positive(self, "max_tokens", "concurrency", "timeout_s", prefix="judge.")
        if self.temperature < 0:
            raise ConfigError("judge.temperature", f"must be >= 0, got {self.temperature}")
        if self.max_retries < 0 or self.backoff_s < 0:
            key = "judge.max_retries" if self.max_retries < 0 else "judge.backoff_s"
            raise ConfigError(key, "must be >= 0")
        require_at_most(self, WEEK_S, "timeout_s", prefix="judge.", fix="seconds: at most a week")
        require_at_most(self, MAX_RETRIES, "max_retries", prefix="judge.")
        waits = self.backoff_s * (2**self.max_retries - 1)  # the delay doubles on each retry
        if waits > WEEK_S:
            raise ConfigError("judge.backoff_s", f"{self.backoff_s:g}s doubled on each of judge.max_retries="
                              f"{self.max_retries} retries waits {waits:.3g}s in all, more than a week",
                              "lower judge.backoff_s or judge.max_retries")


def check_base_url(url: str) -> None:
    """An http(s) URL with a host, a port (if any) in 1..65535, and no query, fragment,
    credentials or whitespace: the request URL is this plus `/chat/completions`."""
    authority = re.split(r"[/?#]", url.partition("//")[2], maxsplit=1)[0]  # what urlsplit takes for the netloc
    if "@" in authority:  # even `http://:KEY@host`, whose username is empty; the message does not repeat it
        raise ConfigError("judge.base_url", "credentials in the URL (user:password@host) are refused: they would be "
                          "printed and recorded with the results",
                          "pass the key through the environment variable that judge.api_key_env names")
    fix = "pass e.g. http://127.0.0.1:8000/v1 (the part before /chat/completions)"
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError when not a number in 0..65535
    except ValueError as exc:  # also an unclosed IPv6 bracket
        raise ConfigError("judge.base_url", f"{url!r} is not an http(s) base URL ({exc})", fix) from None
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment
            or port == 0 or any(c.isspace() or ord(c) < 32 for c in url)):
        raise ConfigError("judge.base_url", f"{url!r} is not an http(s) base URL", fix)


@dataclass
class JudgeConfig(Frozen):
    """`orlhf judge`: grade answers with a judge model into `run_dir/judge/`. `format`:
    `single` (MT-bench single-answer grading, FastChat's single-v1 / single-math-v1 prompts),
    `pairwise` (FastChat's pair-v2 / pair-math-v1, both orders, against `baseline`, or every
    pair of models when it is empty) or `paper` (the paper's Appendix A prompt: all answers
    to a question in one call, anonymized and shuffled with `seed`). A rerun sends only the
    judgments that are missing."""

    run_dir: str = "runs/default"  # the run folder; results go to run_dir/judge/
    questions: str = ""  # FastChat question file: question_id, category, turns
    # answer files to grade: [{model: NAME, path: FILE}] (FastChat or `orlhf eval` format)
    answers: list[JudgeAnswersConfig] = field(default_factory=list)
    reference_answers: str = ""  # FastChat answer file; needed for math/reasoning/coding questions
    judge_prompts: str = ""  # FastChat's judge_prompts.jsonl (single and pairwise formats)
    judge: JudgeEndpointConfig = field(default_factory=JudgeEndpointConfig)
    format: str = "single"  # single (MT-bench 1-10), pairwise (FastChat pair-v2, both orders) or paper (Appendix A)
    baseline: str = ""  # a model of `answers`: paired comparisons against it; pairwise: "" judges every pair
    seed: int = 0  # the paper format's per-question order of the assistants
    # a request the judge cannot judge (prompt past its context, a reply without content) is
    # skipped and counted; strict makes it an error naming the question and model
    strict: bool = False

    def __post_init__(self):
        require_run_dir(self)
        require_seed(self)
        require(self, "questions", fix="pass a FastChat question file (question_id, category, turns)")
        if self.format not in FORMATS:
            raise ConfigError("format", f"unknown format {self.format!r}", f"use one of {', '.join(FORMATS)}")
        self._check_answers()
        self.judge.check()
        if self.format != "paper":
            require(self, "judge_prompts", fix="pass FastChat's judge_prompts.jsonl (lm-sys/FastChat: "
                    "fastchat/llm_judge/data/judge_prompts.jsonl)")

    def _check_answers(self) -> None:
        if not self.answers:
            raise ConfigError("answers", "is empty", "list [{model: NAME, path: FILE}, ...]")
        names = []
        for index, entry in enumerate(self.answers):
            if not entry.model or not entry.path:
                raise ConfigError(f"answers[{index}]", "needs both model and path", "write {model: NAME, path: FILE}")
            names.append(entry.model)
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError("answers", f"model {repeated[0]!r} is listed twice",
                              "give every answer file its own name")
        if self.baseline and self.baseline not in names:
            raise ConfigError("baseline", f"{self.baseline!r} is not among the models {names}", "name one of them")
        if self.format in ("pairwise", "paper") and len(names) < 2:
            raise ConfigError("answers", f"format={self.format} compares models and needs two or more")
        if self.format == "paper" and len(names) > PAPER_MAX_MODELS:
            raise ConfigError("answers", f"format=paper names at most {PAPER_MAX_MODELS} assistants (A..Z), "
                              f"got {len(names)}")
