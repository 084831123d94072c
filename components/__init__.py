"""KFP components, one module per step, each a small typed function over ``redrec.pipeline.steps``.

KFP runs a lightweight component's function source in a fresh process, so every body imports
``redrec`` itself; nothing is pip-installed at run time (``packages_to_install=[]``): the image
(cluster, ``kfp.local.DockerRunner``) or the current environment
(``kfp.local.SubprocessRunner(use_venv=False)``) carries redrec. ``build(image)`` decorates the
functions for an image; ``DEFAULT`` uses ``$REDREC_PIPELINE_IMAGE`` or the project's image name.
"""

import os
from types import SimpleNamespace

from kfp import dsl

from components.build_features import build_features
from components.check_drift import check_drift
from components.deploy import deploy
from components.evaluate import evaluate
from components.gate import gate
from components.onboard_items import onboard_items
from components.prepare_data import prepare_data
from components.publish import publish
from components.record_reference import record_reference
from components.train import train

DEFAULT_IMAGE = "ghcr.io/redrec/redrec:0.1.0"
STEP_FUNCTIONS = (prepare_data, build_features, train, evaluate, gate, publish, deploy, record_reference, check_drift,
                  onboard_items)


def build(image: str | None = None) -> SimpleNamespace:
    """The components for ``image`` (each a ``@dsl.component`` with no run-time pip install, not even of kfp: the image has it)."""
    image = image or os.environ.get("REDREC_PIPELINE_IMAGE", DEFAULT_IMAGE)
    return SimpleNamespace(**{f.__name__: dsl.component(base_image=image, packages_to_install=[], install_kfp_package=False)(f)
                              for f in STEP_FUNCTIONS})


DEFAULT = build()
