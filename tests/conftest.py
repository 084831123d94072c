import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions"))
os.environ.setdefault("REDREC_CACHE", str(ROOT / "build" / "cache"))


@pytest.fixture(scope="session")
def synthetic_small():
    from redrec.data.synthetic import SyntheticConfig, generate

    return generate(SyntheticConfig(n_users=120, n_items=200, seed=3))
