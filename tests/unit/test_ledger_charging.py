"""Which executions Table 3 charges (`charged`, `result_chain`): a stage's last completed
execution and the earlier ones it resumed, down to the fresh start; rows written before
rows said whether they resumed keep the older rule; PPO's services follow the actor
execution they served. Synthetic ledger rows, each lasting one hour."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone

from offline_rlhf.eval import report
from offline_rlhf.eval.report import charged, device_hours, stages_markdown
from offline_rlhf.ledger import HEARTBEAT_DIR, LedgerRow, OneProcess, append_row, read_ledger, result_chain, track

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
PPO_SERVICES = ("ppo_critic", "ppo_reference", "ppo_reward")


def row(stage: str, status: str, hour: int, resumed: bool | None, tokens: int = 100, hours: float = 1.0) -> LedgerRow:
    start = T0 + timedelta(hours=hour)
    return LedgerRow(stage=stage, start=start.isoformat(), end=(start + timedelta(hours=1)).isoformat(),
                     status=status, nodes=1, processes=1, devices=1, device_type="cpu", wall_seconds=hours * 3600,
                     device_hours=hours, tokens=tokens, resumed=resumed)


def test_a_fresh_rerun_supersedes_every_earlier_execution(tmp_path):
    """The reviewer's repro: a trained model, its checkpoints moved away, a rerun killed before
    its first checkpoint, a rerun from SFT that completes: only that one is charged."""
    rows = [row("align_mle_filter", "completed", 0, False, hours=1.0),
            row("align_mle_filter", "interrupted", 1, False, hours=0.5),
            row("align_mle_filter", "completed", 2, False, hours=2.0),
            row("label", "completed", 3, False), row("label", "completed", 4, False)]  # a relabel replaced the labels
    assert charged(rows) == [False, False, True, False, True]
    for each in rows:
        append_row(tmp_path, each)
    hours = device_hours(tmp_path)["align_mle_filter"]
    assert (hours["device_hours"], hours["executions"], hours["not_charged_device_hours"]) == (2.0, 1, 1.5)
    assert (hours["interrupted"], hours["superseded"], hours["failed"]) == (1, 1, 0)
    assert "| align_mle_filter | 2.0000 | 7200.0 | 1 | 1.5000 | 1 interrupted, 1 superseded |" in \
        stages_markdown(device_hours(tmp_path))


def test_a_resumed_chain_charges_the_executions_it_continued_whatever_their_status():
    stages = ["sft"] * 8
    statuses = ["completed", "interrupted", "failed", "interrupted", "failed", "completed", "interrupted", "failed"]
    resumed = [False, False, True, True, False, True, True, True]
    # 0 is superseded by the fresh start 1 (killed), which 2 resumed (then crashed: a checkpoint
    # was saved) and 3 resumed (killed; its heartbeat may not show its tokens yet); 4 was
    # refused at the start (failed without a token: nothing of it was continued); 5 resumed
    # 3's checkpoint and completed; 6 and 7 (a longer run) have not completed.
    tokens = [100, 100, 100, 0, 0, 100, 100, 0]
    rows = [row(s, st, hour, r, t) for hour, (s, st, r, t) in enumerate(zip(stages, statuses, resumed, tokens))]
    assert charged(rows) == [False, True, True, True, False, True, False, False]


def test_rows_that_do_not_say_whether_they_resumed_keep_the_older_rule():
    """Completed executions and interrupted ones completed since are charged; a failed one
    and those after the last completion are not."""
    old = [row("sft", status, hour, None) for hour, status in
           enumerate(["interrupted", "completed", "failed", "completed", "interrupted", "failed"])]
    assert charged(old) == [True, True, False, True, False, False]
    # A newer execution that resumed: the failed one it continued (it counted tokens: it may have
    # saved a checkpoint), then the older rule from that row back.
    assert charged([*old, row("sft", "completed", 6, True)]) == [True, True, False, True, True, True, True]
    # A newer fresh one replaced their result.
    assert charged([*old, row("sft", "completed", 6, False)]) == [False] * 6 + [True]


def ppo_execution(hour: int, actor: str, resumed: bool, services: tuple[str, str, str]) -> list[LedgerRow]:
    """One PPO execution: the actor's row and its three services' rows, in the same hour."""
    return [row("ppo_actor", actor, hour, resumed),
            *(row(stage, status, hour, False) for stage, status in zip(PPO_SERVICES, services))]


def test_ppo_services_are_charged_exactly_with_the_actor_execution_they_served(tmp_path):
    """The reviewer's repro: the reward service killed after the last checkpoint, the actor
    fails, the critic and reference shut down cleanly; the rerun resumes the checkpoint."""
    superseded = ppo_execution(0, "completed", False, ("completed", "completed", "completed"))
    crashed = ppo_execution(1, "failed", False, ("completed", "completed", "interrupted"))
    resumed = ppo_execution(2, "completed", True, ("completed", "completed", "completed"))
    unfinished = ppo_execution(3, "interrupted", True, ("interrupted", "interrupted", "interrupted"))
    rows = [*superseded, *crashed, *resumed, *unfinished]
    assert charged(rows) == [False] * 4 + [True] * 8 + [False] * 4
    for each in rows:
        append_row(tmp_path, each)
    hours = device_hours(tmp_path)
    assert (hours["ppo_actor"]["executions"], hours["ppo_actor"]["superseded"], hours["ppo_actor"]["interrupted"]) \
        == (2, 1, 1)
    reward = hours["ppo_reward"]
    assert (reward["executions"], reward["superseded"], reward["interrupted"], reward["failed"]) == (2, 1, 1, 0)
    # Without a charged actor execution, no service row is charged, however it ended.
    assert not any(charged(crashed + unfinished))


def test_a_stage_records_whether_it_resumed_in_its_row_and_heartbeat(tmp_path):
    """`usage.resumed` reaches the heartbeat at once (a kill right after leaves the right
    value) and the row; a stage that never sets it records a fresh execution."""
    with track(tmp_path, "generate", OneProcess(), "cpu") as usage:
        usage.resumed = True
        heartbeat = json.loads((tmp_path / HEARTBEAT_DIR / "generate.json").read_text())
        assert heartbeat["resumed"] is True
    with track(tmp_path, "label", OneProcess(), "cpu"):
        pass
    assert [(r.stage, r.resumed) for r in read_ledger(tmp_path)] == [("generate", True), ("label", False)]


def test_an_execution_killed_before_it_knew_whether_it_resumed_does_not_end_the_chain(tmp_path):
    """Killed in its start-up (before its checkpoint was looked at), an execution's heartbeat
    says it resumed: the next execution resumed the checkpoint the one before it saved, so
    that one is still charged. (Recorded as a fresh start, it ended the walk back.)"""
    with track(tmp_path, "sft", OneProcess(), "cpu") as usage:
        heartbeat = json.loads((tmp_path / HEARTBEAT_DIR / "sft.json").read_text())
        assert heartbeat["resumed"] is True and usage.finish("failed").resumed is False
    fresh = row("sft", "interrupted", 0, False)
    killed_in_start_up = LedgerRow(**{**heartbeat, "start": (T0 + timedelta(hours=1)).isoformat()})
    assert charged([fresh, killed_in_start_up, row("sft", "completed", 2, True)]) == [True, True, True]


def charged_pairwise(rows: list[LedgerRow]) -> list[bool]:
    """`charged` as it was written first: every service row against every charged actor row
    (quadratic in the number of relaunches: 1 s at 5,000 rows)."""
    flags = [False] * len(rows)
    for stage in {each.stage for each in rows}:
        indices = [k for k, each in enumerate(rows) if each.stage == stage]
        for k, counted in zip(indices, result_chain([rows[k] for k in indices])):
            flags[k] = counted
    span = lambda each: (datetime.fromisoformat(each.start), datetime.fromisoformat(each.end))  # noqa: E731
    actors = [span(each) for each, counted in zip(rows, flags) if counted and each.stage == "ppo_actor"]
    return [any(span(each)[0] < actor[1] and actor[0] < span(each)[1] for actor in actors)
            if each.stage in PPO_SERVICES else counted for each, counted in zip(rows, flags)]


def test_ppo_charging_over_many_relaunches_is_the_pairwise_rule_parsing_each_row_once(monkeypatch):
    """400 random relaunches (spans that nest, touch, overlap or last no time; actors that
    fail, are killed, resume or start fresh): the same flags as every service row against
    every actor row, each row's times read once (not once per actor row)."""
    rng = random.Random(0)

    def minutes_row(stage: str, start: int, length: int, resumed: bool) -> LedgerRow:
        begin = T0 + timedelta(minutes=start)
        return LedgerRow(stage=stage, start=begin.isoformat(), end=(begin + timedelta(minutes=length)).isoformat(),
                         status=rng.choice(["completed", "failed", "interrupted"]), nodes=1, processes=1, devices=1,
                         device_type="cpu", wall_seconds=60.0 * length, device_hours=length / 60,
                         tokens=rng.choice([0, 100, 100]), resumed=resumed)

    rows, now = [], 0
    for _ in range(400):
        now += rng.choice([0, 30, 60, 90])
        rows.append(minutes_row("ppo_actor", now, rng.choice([0, 30, 60, 90]), rng.random() < 0.97))
        rows += [minutes_row(stage, now + rng.choice([-10, 0, 10]), rng.choice([0, 10, 60, 120]), False)
                 for stage in PPO_SERVICES]
    rows.append(row("ppo_actor", "completed", 0, True))  # ends the chain
    expected = charged_pairwise(rows)
    services = [flag for flag, each in zip(expected, rows) if each.stage in PPO_SERVICES]
    assert 100 < sum(services) < len(services) - 100  # both kinds, many of each
    spans, span_of = [], report._span
    monkeypatch.setattr(report, "_span", lambda each: spans.append(each) or span_of(each))
    assert charged(rows) == expected
    assert len(spans) <= len(rows)
