"""A damaged ledger line (a torn write, a hand edit) is one line naming file:line."""

import json
from dataclasses import asdict

import pytest

from offline_rlhf.cli import main
from offline_rlhf.data.errors import DataError
from offline_rlhf.ledger import LEDGER, LedgerRow, append_row, read_ledger

ROW = LedgerRow(stage="sft", start="2026-01-01T00:00:00+00:00", end="2026-01-01T01:00:00+00:00", status="completed",
                nodes=1, processes=1, devices=1, device_type="cpu", wall_seconds=3600.0, device_hours=1.0, tokens=5)


@pytest.mark.parametrize("damaged, reason", [('{"stage": "rm", "start', "Unterminated string"),
                                             ('["sft"]', "must be a mapping"),
                                             (json.dumps({**asdict(ROW), "gpus": 8}), "unexpected keyword"),
                                             (json.dumps({**asdict(ROW), "status": "done"}), "got 'done'")])
def test_a_damaged_ledger_line_is_named(tmp_path, capsys, damaged, reason):
    append_row(tmp_path, ROW)
    assert read_ledger(tmp_path) == [ROW]
    with open(tmp_path / LEDGER, "a") as handle:
        handle.write(damaged + "\n")
    with pytest.raises(DataError, match=rf"^{tmp_path / LEDGER}:2: expected a ledger row, .*{reason}.*; repair or "
                                        "delete that line$"):
        read_ledger(tmp_path)
    assert main(["report", f"run_dir={tmp_path}"]) == 2
    assert f"{tmp_path / LEDGER}:2: expected a ledger row" in capsys.readouterr().err


def test_a_stage_stopped_on_request_is_recorded_as_interrupted(tmp_path):
    """A training stage's signal stop (a SystemExit after saving) is resumed by a rerun, so
    the report charges it like a killed execution, not as failed (left uncharged)."""
    from offline_rlhf.ledger import OneProcess, track

    for stopping, status in ((SystemExit(75), "interrupted"), (KeyboardInterrupt(), "interrupted"),
                             (ValueError("bad"), "failed")):
        with pytest.raises(type(stopping)):
            with track(tmp_path, "sft", OneProcess(), "cpu"):
                raise stopping
        assert read_ledger(tmp_path)[-1].status == status
