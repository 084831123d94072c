"""RED-Rec Feast definitions (``feast apply`` reads this module's top-level objects).

All objects come from ``redrec.features.build_definitions`` so the CLI and the library register
the same thing. Configuration, all optional:

- ``REDREC_FEAST_SOURCES``: folder (or URI) of the parquet sources; default
  ``<project>/data/feast_sources`` (where ``redrec.features.FeatureRepo()`` writes by default).
- ``REDREC_SCENARIOS``: comma-separated scenario list; default: the ``scenarios.json`` written
  next to the sources by ``build_sources``, else the synthetic world's homefeed,search,ads.
"""

import os
from pathlib import Path

from redrec.features.definitions import build_definitions
from redrec.features.sources import DEFAULT_SCENARIOS, read_manifest

_sources = os.environ.get("REDREC_FEAST_SOURCES") or str(Path(__file__).resolve().parent.parent / "data" / "feast_sources")
_env_scen = [s.strip() for s in os.environ.get("REDREC_SCENARIOS", "").split(",") if s.strip()]
_manifest = read_manifest(_sources) if "://" not in _sources else None
_scenarios = _env_scen or (_manifest or {}).get("scenarios") or list(DEFAULT_SCENARIOS)

_defs = build_definitions(_scenarios, _sources)
for _obj in _defs.objects():
    globals()[_obj.name] = _obj
