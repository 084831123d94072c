import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# bentos/ and bench/ are not packages of the install: a test importing them must not depend on
# another test module having put the checkout on the path first
sys.path.insert(0, str(ROOT))
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions"))
os.environ.setdefault("REDREC_CACHE", str(ROOT / "build" / "cache"))
# one private BentoML home for the whole session: bentoml reads it once per process, so a test
# that changed it later would leave in-process code and spawned servers on different stores
os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="redrec-bentoml-"))


@pytest.fixture(scope="session")
def synthetic_small():
    from redrec.data.synthetic import SyntheticConfig, generate

    return generate(SyntheticConfig(n_users=120, n_items=200, seed=3))


@pytest.fixture(scope="session")
def image():
    """The runtime image built from this checkout (`make image`), once per session."""
    from docker_util import build_image

    return build_image()
