import pytest

from tests.training.fixtures import build_tiny_data


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Real indexed datasets + SentencePiece tokenizer + blend.json per stage (~10 s)."""
    return build_tiny_data(tmp_path_factory.mktemp("tiny_data"))
