"""What training stages measure: throughput from an analytic FLOPs count (nanoGPT's
`estimate_mfu`, PaLM appendix B), and the `metrics.jsonl` file every training stage writes
(read back by reports)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from offline_rlhf.config.schema import ModelConfig
from offline_rlhf.data.errors import DataError

METRICS_FILE = "metrics.jsonl"

# Dense bf16 peak (no sparsity) by device-name fragment, in FLOP/s.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def training_flops_per_token(cfg: ModelConfig, seq_len: int, head: str = "lm") -> float:
    """Forward + backward FLOPs per token: 6 per weight of every matrix multiply (2 forward,
    4 backward; the embedding lookup is not a matmul, a tied output projection is), plus
    attention scores and weighted values: 6 x 2 x seq_len x head_dim per head and layer
    (causal masking not discounted, as in the PaLM paper's MFU)."""
    norms = (2 * cfg.n_layers + 1) * cfg.dim + (2 * cfg.n_layers * cfg.resolved_head_dim if cfg.qk_norm else 0)
    matmul_params = cfg.num_params(head) - cfg.vocab_size * cfg.dim - norms
    if head == "lm" and cfg.tie_embeddings:
        matmul_params += cfg.vocab_size * cfg.dim  # the tied output projection is still a matmul
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * seq_len
    return 6 * matmul_params + attention


def peak_flops(device: torch.device) -> float | None:
    """bf16 dense peak of a known CUDA device, None otherwise (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def mfu(tokens_per_second: float, cfg: ModelConfig, seq_len: int, device: torch.device,
        head: str = "lm") -> float | None:
    peak = peak_flops(device)
    return None if peak is None else tokens_per_second * training_flops_per_token(cfg, seq_len, head) / peak


def read_metrics(stage_dir: str | Path) -> list[dict]:
    """The rows of a stage's metrics.jsonl, without a last line cut short (a stage killed or
    out of disk mid-write, or still writing it: the resumed run logs that step again)."""
    return metric_rows(Path(stage_dir) / METRICS_FILE)[0]


def metric_rows(path: Path) -> tuple[list[dict], bool]:
    """The rows of `path` (none if it does not exist) and whether a torn last line was left
    out. Damage before the last line is a DataError naming it."""
    rows, torn = [], False
    for _, row in numbered_rows(path):
        if row is None:
            torn = True
        else:
            rows.append(row)
    return rows, torn


def numbered_rows(path: Path) -> Iterator[tuple[int, dict | None]]:
    """(line number, row) for each row of a metrics.jsonl (none if it does not exist), read
    one at a time (a long run's file holds 100k rows), blank lines left out; a torn last line
    comes as (its number, None). Damage before the last line is a DataError naming it."""
    if not path.exists():
        return
    damaged = None  # the number of a line that is no JSON: torn if no row follows it
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, 1):
            if is_blank(line):
                continue
            if damaged is not None:
                raise DataError(path, damaged, "expected a JSON object of one step's metrics (the line is damaged: "
                                "delete it, or the file, to go on)")
            try:
                row = json.loads(line.decode(errors="replace"))
            except json.JSONDecodeError:
                damaged = number
                continue
            yield number, row
    if damaged is not None:
        yield damaged, None


def is_blank(line: bytes) -> bool:
    return not line.decode(errors="replace").strip()
