"""A user's own logs: an events parquet file and an items parquet file in the canonical schema."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from redrec.data.dataset import RecData
from redrec.schema import OnError, validate_events, validate_items


def load_parquet(events: str | Path, items: str | Path, on_error: OnError = "strict") -> RecData:
    items_df = pd.read_parquet(items)
    scen_lists = items_df["scenarios"] if "scenarios" in items_df else []
    # Scenarios are whatever the catalogue declares, in first-seen order, so indices are stable.
    scenarios: list[str] = []
    for s in scen_lists:
        for x in (s if not isinstance(s, str) else s.split(",")):
            if x and x not in scenarios:
                scenarios.append(str(x))
    items_df, item_report = validate_items(items_df, str(items), on_error=on_error)
    ev, ev_report = validate_events(pd.read_parquet(events), str(events), on_error=on_error, known_items=set(items_df["item_id"]))
    unknown = sorted(set(ev["scenario"]) - set(scenarios))
    if unknown:
        raise ValueError(f"{events}: field 'scenario' uses {unknown}, which no item in {items} is eligible for")
    actions = sorted(ev["action"].unique().tolist())
    return RecData(Path(events).stem, ev, items_df, scenarios, actions, [item_report, ev_report])


def save_parquet(data: RecData, directory: str | Path) -> tuple[Path, Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ev_path, it_path = directory / "events.parquet", directory / "items.parquet"
    data.events.to_parquet(ev_path, index=False)
    data.items.to_parquet(it_path, index=False)
    return ev_path, it_path
