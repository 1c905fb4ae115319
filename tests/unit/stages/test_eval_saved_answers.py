"""`orlhf eval`'s saved answers are reused under the inputs they were saved with (a chat
template's too, whose tuples come back from JSON as lists), and not under other prompts or
another checkpoint saved under the same step folder."""

from types import SimpleNamespace

from offline_rlhf.config.evaluation import EvalConfig, EvalModelConfig
from offline_rlhf.config.schema import TemplateConfig
from offline_rlhf.data.chat_template import build_template
from offline_rlhf.stages.eval import Model, answer_inputs, answered_path, save_answers, saved_answers
from tests.unit.data.test_chat_template import CHATML

PROMPTS = [("Hi.", ()), ("Why?", ())]
ANSWERS = [["Hello.", True, False], ["Because.", False, False]]


def test_answers_are_reused_under_the_same_inputs_only(tmp_path):
    step = tmp_path / "sft" / "step_00000000"
    step.mkdir(parents=True)
    (step / "meta.json").write_text("{}")
    chat = build_template(TemplateConfig(kind="chat"), {"chat_template": CHATML})
    model = Model("sft", step, None, chat, None, None)
    cfg = EvalConfig(run_dir=str(tmp_path), prompts="prompts.jsonl", models=[EvalModelConfig("sft", str(step))],
                     gold="embedded_task")
    said = []
    rt = SimpleNamespace(is_main=True, group=None, stage_dir=tmp_path / "eval", log=said.append)
    save_answers(answered_path(rt, model), answer_inputs(model, PROMPTS, cfg), ANSWERS)
    assert saved_answers(model, answer_inputs(model, PROMPTS, cfg), rt) == ANSWERS
    assert said[-1].startswith(f"eval sft: reusing its 2 answers from {answered_path(rt, model)} (written ")
    assert saved_answers(model, answer_inputs(model, PROMPTS[:1], cfg), rt) is None  # other prompts
    assert said[-1].startswith("eval sft: answering again: prompts_sha256 changed since")
    (step / "meta.json").write_text('{"another": "training"}')  # another checkpoint under the same step folder
    assert saved_answers(model, answer_inputs(model, PROMPTS, cfg), rt) is None
    assert said[-1].startswith("eval sft: answering again: model_meta_sha256 changed since")
