"""The durable log of judge calls (`judge/calls.jsonl`): one line per answered request,
keyed by a digest of exactly what was asked and of whom (judge model, messages,
temperature, max_tokens: not the endpoint's address, which changes with a served judge's
node and port), and recording the endpoint that answered. An unusable reply (`error` set: the prompt exceeds the judge's
context, or the reply had no content) is logged too: it is what the judge answers to that
request, so a rerun does not pay for it again. Each line is appended and fsynced as its
reply arrives, so a crashed or rate-limited run loses at most the requests in flight, and a
rerun asks only what the log lacks. A line torn by a crash mid-write (the last one, without
its newline) is dropped."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from offline_rlhf.data.errors import DataError


@dataclass(frozen=True)
class Answered:
    key: str
    judgment: str
    retries: int
    prompt_tokens: int
    completion_tokens: int
    tstamp: float
    error: str = ""  # why the reply is no usable judgment ("" when it is one); logs without it load
    detail: str = ""  # what the server said about it
    base_url: str = ""  # the endpoint that answered ("" in logs written before it was recorded)


def call_key(model: str, messages: list[dict[str, str]], temperature: float, max_tokens: int) -> str:
    """The judge is its model name: the same model answers alike at another address (a served
    judge's node and port change from job to job). A run told another endpoint says how
    many judgments it reuses from elsewhere (`runner.reused_elsewhere`)."""
    request = {"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


class CallLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.answered: dict[str, Answered] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                entry = Answered(**json.loads(raw))
            except (ValueError, TypeError, RecursionError):  # RecursionError: JSON nested past the parser's depth
                if number == len(lines):  # the torn tail of a killed write: cut it off
                    with open(self.path, "r+b") as handle:
                        handle.truncate(len(data) - len(raw))
                    continue
                raise DataError(self.path, number, "expected a judge call this stage logged (delete the file "
                                "to judge everything again)") from None
            self.answered[entry.key] = entry

    def append(self, entry: Answered) -> None:
        """One write of one line on an O_APPEND file, then fsync: durable before it counts."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(asdict(entry)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.answered[entry.key] = entry
