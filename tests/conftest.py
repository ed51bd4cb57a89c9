"""Test set-up: the bundle's code is the package ``scripts`` inside ``eoir_bundle/``
(the model-zoo convention), so the bundle folder goes on ``sys.path``."""

import os
import sys
from pathlib import Path

import pytest

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "eoir_bundle"
sys.path.insert(0, str(BUNDLE_ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def bundle_root() -> Path:
    return BUNDLE_ROOT
