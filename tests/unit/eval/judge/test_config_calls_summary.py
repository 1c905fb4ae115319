"""The judge's config checks, its durable call log, and its summary statistics on small
hand-computed cases."""

from __future__ import annotations

import json
import math

import pytest

from offline_rlhf.config.compose import compose_stage
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.judging import JudgeConfig, check_base_url
from offline_rlhf.data.errors import DataError
from offline_rlhf.eval.judge.calls import Answered, CallLog, call_key
from offline_rlhf.eval.judge.client import api_key
from offline_rlhf.eval.judge.inputs import read_answers, read_questions
from offline_rlhf.eval.judge.runner import key_exposure, write_results
from offline_rlhf.eval.judge.summary import pairwise_summary, paper_summary, single_summary
from offline_rlhf.eval.stats import clustered_stderr, mean_and_stderr, paired_stderr

BASE = ["questions=q.jsonl", "judge.model=judge-x", "judge_prompts=p.jsonl"]


def compose(*overrides):
    return compose_stage("judge", JudgeConfig, [*BASE, *overrides])


def test_the_shipped_defaults_compose():
    cfg = compose()
    assert cfg.format == "single" and cfg.baseline == "sft" and len(cfg.answers) == 4
    assert cfg.judge.temperature == 0.0 and cfg.judge.max_tokens == 2048


@pytest.mark.parametrize("overrides, key", [
    (["judge.base_url=ftp://host/v1"], "judge.base_url"),
    (["judge.base_url='http://h/v1?x=1'"], "judge.base_url"),
    (["judge.base_url='http://user:pw@h/v1'"], "judge.base_url"),
    (["judge.base_url=''"], "judge.base_url"),
    (["judge.api_key_env=sk-live-123"], "judge.api_key_env"),
    (["judge.concurrency=0"], "judge.concurrency"),
    (["judge.timeout_s=0"], "judge.timeout_s"),
    (["judge.max_retries=-1"], "judge.max_retries"),
    (["judge.temperature=-0.5"], "judge.temperature"),
    (["format=elo"], "format"),
    (["baseline=gpt-5"], "baseline"),
    (["judge_prompts=''"], "judge_prompts"),
    (["answers=[{model: a, path: x}]", "format=pairwise", "baseline=''"], "answers"),
    (["answers=[{model: a, path: x}, {model: a, path: y}]", "baseline=''"], "answers"),
])
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        compose(*overrides)
    assert err.value.key == key


@pytest.mark.parametrize("url", ["http://:sk-SECRET@127.0.0.1:8000/v1", "http://user:sk-SECRET@h/v1",
                                 "http://sk-SECRET@h/v1", "http://@h/v1", "https://h\\@sk-SECRET/v1"])
def test_credentials_in_the_base_url_are_refused_without_repeating_them(url):
    with pytest.raises(ConfigError) as err:
        check_base_url(url)
    message = str(err.value)
    assert err.value.key == "judge.base_url" and "credentials in the URL" in message and "judge.api_key_env" in message
    assert "SECRET" not in message and "\n" not in message


@pytest.mark.parametrize("url, why", [
    ("http://127.0.0.1:99999/v1", "Port out of range"),
    ("http://127.0.0.1:abc/v1", "Port could not be cast to integer"),
    ("http://[::1/v1", "Invalid IPv6 URL"),
    ("https://h:0/v1", ""),
])
def test_a_base_url_without_a_usable_port_or_host_is_a_config_error(url, why):
    with pytest.raises(ConfigError) as err:
        check_base_url(url)
    assert err.value.key == "judge.base_url" and f"{url!r} is not an http(s) base URL" in str(err.value)
    assert why in str(err.value)


@pytest.mark.parametrize("url", ["http://[::1]:8000/v1", "https://h:65535/v1", "http://h:1/v1", "HTTPS://h/v1"])
def test_base_urls_with_ports_and_ipv6_hosts_pass(url):
    check_base_url(url)


def test_results_with_a_non_finite_number_are_an_error_and_no_file(tmp_path):
    """A non-finite number in results.json would be a bug (scores are 1..10): it is raised,
    not written as JSON's non-standard `Infinity`."""
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_results(tmp_path, {"format": "single", "summary": {"models": {"a": {"mean": math.inf}}}})
    assert list(tmp_path.iterdir()) == []


def test_the_paper_format_needs_no_fastchat_prompts():
    assert compose("judge_prompts=''", "format=paper").format == "paper"


def test_a_torn_last_line_is_dropped_and_a_bad_middle_line_is_an_error(tmp_path):
    log = CallLog(tmp_path / "calls.jsonl")
    log.append(Answered("k1", "Rating: [[3]]", 1, 10, 5, 1.0))
    with open(log.path, "a") as handle:
        handle.write('{"key": "k2", "judgment": "Rat')  # killed mid-write
    again = CallLog(log.path)
    assert list(again.answered) == ["k1"] and again.answered["k1"].retries == 1
    again.append(Answered("k3", "x", 0, 0, 0, 2.0))
    assert [json.loads(line)["key"] for line in log.path.read_text().splitlines()] == ["k1", "k3"]
    log.path.write_text('{"key": 1}\n' + log.path.read_text())
    with pytest.raises(DataError, match=r"calls.jsonl:1: expected a judge call"):
        CallLog(log.path)
    log.path.write_text(log.path.read_text().replace('{"key": 1}', "[" * 100_000 + "]" * 100_000))
    with pytest.raises(DataError, match=r"calls.jsonl:1: expected a judge call"):  # nested past the parser's depth
        CallLog(log.path)


def test_the_call_key_covers_everything_that_changes_the_reply():
    chat = [{"role": "user", "content": "hi"}]
    key = call_key("m", chat, 0.0, 10)
    assert key == call_key("m", [dict(chat[0])], 0.0, 10)
    assert len({key, call_key("m2", chat, 0.0, 10), call_key("m", chat, 0.5, 10), call_key("m", chat, 0.0, 11),
                call_key("m", [{"role": "user", "content": "hi!"}], 0.0, 10)}) == 5


def test_a_log_written_before_unusable_replies_were_logged_still_loads(tmp_path):
    path = tmp_path / "calls.jsonl"
    path.write_text(json.dumps({"key": "k1", "judgment": "[[4]]", "retries": 0, "prompt_tokens": 1,
                                "completion_tokens": 2, "tstamp": 1.0}) + "\n")
    log = CallLog(path)
    log.append(Answered("k2", "$ERROR$", 0, 0, 0, 2.0, "context_length_exceeded", "too long"))
    again = CallLog(path)
    assert again.answered["k1"].error == "" and again.answered["k2"].error == "context_length_exceeded"


def test_eval_answers_match_questions_by_prompt_and_fastchat_ones_by_id(write_file):
    questions = read_questions(write_file("q.jsonl", '{"question_id": 7, "category": "x", "turns": ["  Hi? "]}',
                                          '{"question_id": 8, "turns": ["Two", "turns"]}'))
    evaluated = read_answers(write_file("a.jsonl", '{"prompt": "Hi?", "response": " ans "}',
                                        '{"prompt": "other", "response": "r"}'), questions)
    assert evaluated.turns == {7: (" ans ",)} and evaluated.unmatched == 1
    samples = read_answers(write_file("s.jsonl", *(f'{{"prompt": "Hi?", "sample": {k}, "response": "r{k}"}}'
                                                   for k in range(3))), questions)
    assert samples.turns == {7: ("r0",)} and samples.unmatched == 0  # eval's generation.n: the first is judged
    fastchat = read_answers(write_file("f.jsonl", '{"question_id": 8, "choices": [{"turns": ["a", "b"]}]}'),
                            questions)
    assert fastchat.turns == {8: ("a", "b")}
    with pytest.raises(DataError, match=r"d.jsonl:2: expected one answer per question"):
        read_answers(write_file("d.jsonl", *['{"question_id": 8, "choices": [{"turns": ["a"]}]}'] * 2), questions)
    with pytest.raises(DataError, match=r"b.jsonl:1: expected a FastChat answer"):
        read_answers(write_file("b.jsonl", '{"text": "x"}'), questions)
    with pytest.raises(DataError, match=r"r.jsonl:2: expected a new question_id"):
        read_questions(write_file("r.jsonl", *['{"question_id": 1, "turns": ["a"]}'] * 2))


def single(qid, model, score, turn=1):
    return {"question_id": qid, "model": model, "score": score, "turn": turn}


def test_single_summary_pairs_with_the_baseline_on_the_same_questions():
    records = [single(1, "a", 8), single(2, "a", 6), single(3, "a", 9), single(4, "a", -1),
               single(1, "b", 7), single(2, "b", 6), single(3, "b", 5), single(4, "b", 4), single(1, "b", 3, turn=2)]
    summary = single_summary(records, ["a", "b"], "b")
    assert summary["models"]["a"]["mean"] == pytest.approx(23 / 3) and summary["models"]["a"]["n"] == 3
    assert (summary["models"]["b"]["n"], summary["models"]["b"]["judgments"]) == (4, 5)
    assert summary["models"]["b"]["by_turn"] == {
        "1": pytest.approx({"mean": 5.5, "stderr": 0.6454972, "n": 4, "judgments": 4}),
        "2": {"mean": 3, "stderr": 0.0, "n": 1, "judgments": 1}}
    assert summary["parse_failures"] == 1
    vs = summary["vs_baseline"]["a"]
    # Differences on questions 1-3 (4 has no parsed score for a): 1, 0, 4.
    assert vs["n"] == 3 and vs["difference"] == pytest.approx(5 / 3)
    assert vs["difference_stderr"] == pytest.approx(((1 - 5 / 3) ** 2 + (5 / 3) ** 2 + (4 - 5 / 3) ** 2) ** 0.5
                                                    / 2 ** 0.5 / 3 ** 0.5)
    assert (vs["win"], vs["tie"], vs["loss"], vs["win_rate"]) == pytest.approx((2 / 3, 1 / 3, 0, 5 / 6))
    assert vs["win_low"] <= vs["win"] <= vs["win_high"]


def game(g1, g2, qid=1):
    return {"question_id": qid, "model_1": "a", "model_2": "base", "g1_winner": g1, "g2_winner": g2, "turn": 1}


def test_pairwise_order_flips_count_as_ties_and_unreadable_games_are_left_out():
    verdicts = [("model_1", "model_1"), ("model_1", "model_2"), ("tie", "tie"), ("model_2", "model_2"),
                ("model_1", "tie"), ("error", "model_1"), ("model_1", "model_1")]
    records = [game(*v, qid=i) for i, v in enumerate(verdicts)]
    summary = pairwise_summary(records)
    row = summary["games"][0]
    assert (row["model"], row["opponent"], row["n"], row["judgments"]) == ("a", "base", 6, 6)
    assert (row["win"], row["tie"], row["loss"]) == pytest.approx((2 / 6, 3 / 6, 1 / 6))
    assert row["inconsistent"] == 2 and summary["inconsistency_rate"] == pytest.approx(2 / 6)
    assert summary["parse_failures"] == 1 and summary["games_with_unreadable_verdicts"] == 1


def test_paper_summary_reports_raw_and_rank_scores():
    records = [{**single(1, "a", 9), "rank_score": 2.0}, {**single(1, "b", 4), "rank_score": 1.0},
               {**single(2, "a", -1), "rank_score": None}, {**single(2, "b", 6), "rank_score": None}]
    summary = paper_summary(records, ["a", "b"], "")
    assert summary["models"]["a"]["mean"] == 9 and summary["models"]["b"]["mean"] == 5
    assert summary["models"]["b"]["rank_score"]["mean"] == 1.0 and summary["questions_unranked"] == 1
    assert summary["parse_failures"] == 1 and summary["vs_baseline"] == {}


def test_a_key_sent_over_plain_http_to_another_host_is_warned_about():
    remote = compose("judge.base_url=http://judge.example.org/v1")
    assert "over plain http" in key_exposure(remote, "k")
    assert key_exposure(remote, None) is None
    assert key_exposure(compose("judge.base_url=https://judge.example.org/v1"), "k") is None
    assert key_exposure(compose("judge.base_url=http://127.0.0.1:8000/v1"), "k") is None


@pytest.mark.parametrize("value", ["", "   ", "\t\n"])
def test_an_unset_empty_or_blank_key_variable_is_refused(value, monkeypatch):
    monkeypatch.setenv("ORLHF_JUDGE_TEST_KEY", value)
    with pytest.raises(ConfigError) as error:
        api_key(compose("judge.api_key_env=ORLHF_JUDGE_TEST_KEY").judge)
    assert error.value.key == "judge.api_key_env" and "ORLHF_JUDGE_TEST_KEY is unset or empty" in str(error.value)
    monkeypatch.delenv("ORLHF_JUDGE_TEST_KEY")
    with pytest.raises(ConfigError, match="judge.api_key_env: "):
        api_key(compose("judge.api_key_env=ORLHF_JUDGE_TEST_KEY").judge)


def test_the_key_is_read_stripped_and_none_without_a_variable(monkeypatch):
    monkeypatch.setenv("ORLHF_JUDGE_TEST_KEY", " sk-test\n")
    assert api_key(compose("judge.api_key_env=ORLHF_JUDGE_TEST_KEY").judge) == "sk-test"
    assert api_key(compose().judge) is None


def test_a_question_counts_once_however_many_turns_it_has():
    """Both turns of a question are one unit: judging each turn twice (a second turn that
    repeats the first) must not shrink a standard error or an interval, nor grow n."""
    a, b = [8, 6, 9, 5, 7, 7, 2], [7, 6, 5, 4, 8, 7, 3]
    one = [single(q, m, s) for q, (x, y) in enumerate(zip(a, b)) for m, s in (("a", x), ("b", y))]
    two = one + [{**r, "turn": 2} for r in one]
    once, twice = single_summary(one, ["a", "b"], "b"), single_summary(two, ["a", "b"], "b")
    for key in ("n", "difference", "difference_stderr", "win", "win_low", "win_high", "loss_low", "loss_high",
                "win_rate", "win_rate_low", "win_rate_high"):
        assert twice["vs_baseline"]["a"][key] == pytest.approx(once["vs_baseline"]["a"][key]), key
    assert (twice["vs_baseline"]["a"]["n"], twice["vs_baseline"]["a"]["judgments"]) == (7, 14)
    assert twice["models"]["a"]["stderr"] == pytest.approx(once["models"]["a"]["stderr"])
    assert (twice["models"]["a"]["n"], twice["models"]["a"]["judgments"]) == (7, 14)
    # One judgment per question: the usual sample standard errors.
    assert once["models"]["a"]["stderr"] == pytest.approx(mean_and_stderr(a)[1])
    assert once["vs_baseline"]["a"]["difference_stderr"] == pytest.approx(paired_stderr(a, b))


def test_the_clustered_standard_error_sums_a_questions_deviations():
    # Mean 2; the questions' summed deviations -1 - 1 = -2 and 0 + 2 = 2: sqrt(2/1 * 8) / 4.
    assert clustered_stderr([[1, 1], [2, 4]]) == pytest.approx(8 ** 0.5 * 2 ** 0.5 / 4)
    assert clustered_stderr([[1, 5]]) == 0.0


def test_unusable_judgments_are_counted_apart_from_unreadable_ones():
    records = [single(1, "a", -1), {**single(2, "a", -1), "error": "no_content"},
               {**single(3, "a", -1), "error": "context_length_exceeded"}, single(1, "b", 4)]
    summary = single_summary(records, ["a", "b"], "")
    assert summary["parse_failures"] == 1 and summary["models"]["a"]["parse_failures"] == 1
    assert summary["unusable"] == {"a": {"context_length_exceeded": 1, "no_content": 1}}
    assert summary["models"]["b"]["unusable"] == {}
    paper = paper_summary([{**r, "rank_score": None} for r in records], ["a", "b"], "")
    assert paper["unusable"] == summary["unusable"] and paper["parse_failures"] == 1
    games = [{**game("error", "model_1"), "g1_error": "no_content"}, game("error", "tie", qid=2)]
    pairwise = pairwise_summary(games)
    assert pairwise["unusable"] == {"a vs base": {"no_content": 1}} and pairwise["parse_failures"] == 1
    assert pairwise["games_with_unreadable_verdicts"] == 2 and pairwise["games"] == []
