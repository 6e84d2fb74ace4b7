"""Fixtures of the eval tests: a tiny random llama saved with a tiny tokenizer (an HF folder ``LLM`` loads)."""
from __future__ import annotations

import pytest

from tests.structured_helpers import build_tiny_llm, tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_tiny_llm(tmp_path_factory.mktemp("eval-tiny"), tiny_tokenizer())
