"""Test set-up: make the helper modules of tests/ importable (cases, hf_reference)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
