"""Test set-up: the helper modules of tests/ (cases, hf_reference, albert_spiece) become
importable, and the stand-in tokenizer is a fixture shared by the test files."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def spiece_path(tmp_path_factory):
    """A SentencePiece model in the ALBERT layout, trained from tests/data (albert_spiece)."""
    from albert_spiece import build_spiece

    return build_spiece(tmp_path_factory.mktemp("spiece") / "spiece.model")


@pytest.fixture(scope="session")
def tok(spiece_path):
    """The package's tokenizer on that model."""
    from nystrom_np.tokenizer import Tokenizer

    return Tokenizer(spiece_path)
