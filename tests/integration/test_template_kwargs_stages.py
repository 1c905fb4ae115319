"""`orlhf sft` with the real Qwen3 tokenizer and `data.template.kwargs.enable_thinking=false`
(tests/real_tokenizers.py): the checkpoint records the variable, a later stage configured
without it is stopped naming the key, and `orlhf convert export_hf` writes a chat template
that prompts without thinking when the caller passes nothing, as transformers renders the
original template with `enable_thinking=False`."""

import json

from transformers import AutoTokenizer

from offline_rlhf.checkpoint import TEMPLATE, latest_checkpoint, read_meta
from offline_rlhf.cli import main
from tests.integration.test_generate_stage import generate_args
from tests.integration.test_real_tokenizer_stages import QWEN3_VOCAB
from tests.real_tokenizers import real_tokenizer_dir
from tests.unit.data.test_chat_template import MULTI


def test_sft_without_thinking_records_it_and_the_export_prompts_as_trained(tmp_path, capsys):
    run_dir, tokenizer = tmp_path / "run", real_tokenizer_dir("qwen3")
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Name colour {i}.", "response": f"Colour {i}."}) + "\n"
                            for i in range(4)))
    assert main(["sft", f"run_dir={run_dir}", f"init.tokenizer={tokenizer}", "model=tiny",
                 f"model.vocab_size={QWEN3_VOCAB}", "data.template.kind=chat",
                 "data.template.kwargs.enable_thinking=false", "data.max_seq_len=64", "data.val_fraction=0",
                 f"data.sources=[{{name: d, format: jsonl, path: '{data}'}}]", "train.global_batch=4",
                 "train.micro_batch=4", "train.max_steps=1", "logging.progress=false"]) == 0
    checkpoint = latest_checkpoint(run_dir / "sft" / "checkpoints")
    assert read_meta(checkpoint).metadata[TEMPLATE] == {"kind": "chat", "system": "",
                                                        "kwargs": {"enable_thinking": False}}

    capsys.readouterr()
    assert main(generate_args(run_dir, tmp_path / "gen", "template.kind=chat")) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("orlhf generate: error: template.kwargs: is {}, but ") and \
        "set template.kwargs={enable_thinking: false}" in error, error

    assert main(["convert", "export_hf", f"ckpt={checkpoint}", f"out={tmp_path / 'hf'}"]) == 0
    exported, original = AutoTokenizer.from_pretrained(tmp_path / "hf"), AutoTokenizer.from_pretrained(tokenizer)
    for messages in (MULTI[1:2], MULTI[:-1]):
        prompt = original.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                              enable_thinking=False)
        assert exported.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == prompt
        assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
