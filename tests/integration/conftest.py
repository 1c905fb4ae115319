import pytest

from offline_rlhf.data.tokenizer import train_bpe_tokenizer
from tests.local_data import OASST_TREES, SELF_INSTRUCT


@pytest.fixture(scope="session")
def public_tokenizer(tmp_path_factory):
    """A 512-token byte-level BPE trained on the staged public instruction data."""
    for path in (SELF_INSTRUCT, OASST_TREES):
        assert path.exists(), f"{path} is missing: ../shared/data must sit beside the repository"
    out = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer([SELF_INSTRUCT, OASST_TREES], 512, out)
    return out
