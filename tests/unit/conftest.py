"""Fixtures of the unit tests: the built-in tiny model, loaded once (fp32, CPU).

Tests that change a model (wrap layers, patch forwards) work on a ``copy.deepcopy``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.models import DEFAULT_MODEL_NAME, load_model, load_tokenizer


@pytest.fixture(scope="session")
def tiny_model_path(model_cache: Path) -> str:
    return str(model_cache / DEFAULT_MODEL_NAME)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path: str):
    return load_model(tiny_model_path, "cpu", "float32")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path: str):
    return load_tokenizer(tiny_model_path)
