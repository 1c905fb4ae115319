import pytest

from offline_rlhf.data.tokenizer import train_bpe_tokenizer
from tests.fixtures import SHARED_DATA

SELF_INSTRUCT = SHARED_DATA / "self-instruct" / "data" / "seed_tasks.jsonl"
OASST_TREES = SHARED_DATA / "open-assistant" / "model_eval_manual_data" / "en_100_tree.jsonl"


@pytest.fixture(scope="session")
def public_tokenizer(tmp_path_factory):
    """A 512-token byte-level BPE trained on the staged public instruction data."""
    for path in (SELF_INSTRUCT, OASST_TREES):
        assert path.exists(), f"{path} is missing: ../shared/data must sit beside the repository"
    out = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer([SELF_INSTRUCT, OASST_TREES], 512, out)
    return out
