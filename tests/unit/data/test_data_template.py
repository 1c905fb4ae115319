import pytest

from offline_rlhf.data.template import ASSISTANT, SYSTEM, USER, ChatTemplate


def test_fold_history_single_turn_is_the_stripped_instruction():
    assert ChatTemplate().fold_history([(USER, "  Hi there \n")]) == "Hi there"


def test_fold_history_three_turns_renders_the_conversation_in_the_template():
    template = ChatTemplate()
    folded = template.fold_history([(USER, "u1"), (ASSISTANT, " a1 "), (USER, "u2")])
    assert folded == "u1 Assistant: a1 User: u2"
    assert template.prompt_text(folded) == "User: u1 Assistant: a1 User: u2 Assistant:"


def test_custom_tags_and_separator_are_used_everywhere():
    template = ChatTemplate(user_tag="<|user|>", assistant_tag="<|assistant|>", sep="\n")
    folded = template.fold_history([(USER, "u1"), (ASSISTANT, "a1"), (USER, "u2")])
    assert folded == "u1\n<|assistant|>\na1\n<|user|>\nu2"
    assert template.prompt_text("q") + template.response_text(" r ") == "<|user|>\nq\n<|assistant|>\nr"


def test_prompt_and_response_join_with_exactly_one_separator():
    template = ChatTemplate()
    assert template.prompt_text(" q ") + template.response_text(" r\n") == "User: q Assistant: r"


@pytest.mark.parametrize(
    "turns, message",
    [
        ([(USER, "u1"), (USER, "u2")], "expected turn 2 to be 'assistant', got 'user'"),
        ([(ASSISTANT, "a0"), (USER, "u1")], "expected turn 1 to be 'user', got 'assistant'"),
        ([(USER, "u1"), (ASSISTANT, "a1")], "last turn to be a user turn"),
        ([(USER, "u1"), (ASSISTANT, "  "), (USER, "u2")], "expected turn 2 to have text"),
        ([(USER, "u1"), ("system", "s"), (USER, "u2")], "got 'system'"),
        ([], "at least one user turn"),
        ([(SYSTEM, "s")], "at least one user turn"),
        ([(SYSTEM, " "), (USER, "u1")], "turn 1 \\(system\\) to have text"),
        ([(SYSTEM, "s"), (ASSISTANT, "a0"), (USER, "u1")], "expected turn 2 to be 'user', got 'assistant'"),
        ([(SYSTEM, "s"), (SYSTEM, "t"), (USER, "u1")], "expected turn 2 to be 'user', got 'system'"),
    ],
)
def test_fold_history_rejects_a_malformed_conversation(turns, message):
    with pytest.raises(ValueError, match=message):
        ChatTemplate().fold_history(turns)


def test_a_system_turn_folds_before_the_first_user_turn_a_blank_line_apart():
    """The paper's format has no system turn: its text opens the instruction, as a record's
    leading system message always did."""
    folded = ChatTemplate().fold_history([(SYSTEM, " Be brief. "), (USER, "u1"), (ASSISTANT, "a1"), (USER, "u2")])
    assert folded == "Be brief.\n\nu1 Assistant: a1 User: u2"


def test_empty_tag_is_rejected():
    with pytest.raises(ValueError, match="non-empty tags"):
        ChatTemplate(user_tag=" ")
