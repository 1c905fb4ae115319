import pytest

from tests.unit.data.conftest import write_file  # noqa: F401  (a fixture, shared with the reader tests)
from tests.unit.rm.synthetic import synthetic_tokenizer


@pytest.fixture(scope="session")
def rm_tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rm_tokenizer") / "tokenizer"
    synthetic_tokenizer(out)
    return out
