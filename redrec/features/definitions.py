"""The Feast objects of the RED-Rec feature repo, built from a scenario list and a source folder.

``feature_repo/redrec_features.py`` calls :func:`build_definitions` so ``feast apply`` on the repo
and :meth:`redrec.features.FeatureRepo.apply` register exactly the same objects. Nothing here
names an online store: switching SQLite -> Redis/Postgres is a ``feature_store.yaml`` change.

Objects (names are stable; other components read them):
- entities ``user`` (join key ``user_id``) and ``item`` (``item_id``);
- file sources ``events`` (the raw log, registered for lineage), ``items``, ``item_popularity``
  and ``seq_<scenario>`` (last-N windows, see ``redrec.features.sources``);
- push sources ``seq_<scenario>_push`` (batch source = the scenario's file source) and
  ``item_popularity_push``: fresh state reaches the online store without a rematerialisation;
- feature views ``seq_<scenario>`` (``item_ids: [str]``, ``actions: [str]``, ``timestamps: [int64]``),
  ``item_text`` (title, body, tags, scenarios) and ``item_popularity`` (popularity: int64);
- feature services ``redrec_training`` (all views; entity rows carry user_id and item_id),
  ``redrec_training_user`` (sequence views only) and ``redrec_serving`` (sequence views).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Int64, String

from redrec.features.sources import SourcePaths, check_scenarios, seq_table_name

PROJECT = "redrec"
USER = "user"
ITEM = "item"
SERVICE_TRAINING = "redrec_training"
SERVICE_TRAINING_USER = "redrec_training_user"
SERVICE_SERVING = "redrec_serving"
ITEM_TEXT_VIEW = "item_text"
ITEM_POP_VIEW = "item_popularity"
ITEM_POP_PUSH = "item_popularity_push"
TIMESTAMP = "event_timestamp"


def seq_view_name(scenario: str) -> str:
    return seq_table_name(scenario)


def seq_push_name(scenario: str) -> str:
    return f"{seq_table_name(scenario)}_push"


@dataclass
class Definitions:
    scenarios: list[str]
    entities: dict[str, Entity] = field(default_factory=dict)
    sources: dict[str, object] = field(default_factory=dict)  # file + push sources by name
    views: dict[str, FeatureView] = field(default_factory=dict)
    services: dict[str, FeatureService] = field(default_factory=dict)

    def objects(self) -> list:
        return [*self.entities.values(), *self.sources.values(), *self.views.values(), *self.services.values()]

    def seq_view(self, scenario: str) -> FeatureView:
        try:
            return self.views[seq_view_name(scenario)]
        except KeyError:
            raise KeyError(f"no sequence view for scenario {scenario!r}; the repo declares {self.scenarios}") from None


ENGINES = ("file", "spark")


def _file_source(name: str, path: Path, description: str, engine: str = "file"):
    if engine == "spark":
        # a parquet file or a directory of part files: Spark reads both, partition columns included
        from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

        return SparkSource(name=name, path=str(path), file_format="parquet", timestamp_field=TIMESTAMP,
                           description=description)
    return FileSource(name=name, path=str(path), timestamp_field=TIMESTAMP, description=description)


def build_definitions(scenarios: list[str], source_dir: str | Path, engine: str = "file") -> Definitions:
    """All Feast objects for ``scenarios`` reading parquet files under ``source_dir``.

    ``source_dir`` may be relative: Feast resolves it against the repo path (the folder holding
    ``feature_store.yaml``). The files need not exist for ``apply``; they must for materialise
    and historical retrieval. ``engine``: ``file`` (FileSource, read by the DuckDB or Dask offline
    store) or ``spark`` (SparkSource, read by Feast's Spark offline store).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
    scenarios = check_scenarios(scenarios)
    paths = SourcePaths(Path(source_dir))
    d = Definitions(scenarios=scenarios)
    user = Entity(name=USER, join_keys=["user_id"], value_type=ValueType.STRING, description="a user (canonical user_id)")
    item = Entity(name=ITEM, join_keys=["item_id"], value_type=ValueType.STRING, description="a catalogue item")
    d.entities = {USER: user, ITEM: item}

    events = _file_source("events", paths.events, "canonical behaviour log: user_id, item_id, scenario, action, ts", engine)
    items = _file_source("items", paths.items, "item catalogue: text fields and scenario eligibility", engine)
    pop = _file_source("item_popularity_src", paths.item_popularity, "cumulative events per item, per second", engine)
    pop_push = PushSource(name=ITEM_POP_PUSH, batch_source=pop, description="fresh item popularity")
    d.sources = {s.name: s for s in (events, items, pop, pop_push)}

    seq_views = []
    for s in scenarios:
        name = seq_view_name(s)
        src = _file_source(f"{name}_src", paths.seq(s), f"last-N behaviour windows in scenario {s!r}", engine)
        push = PushSource(name=seq_push_name(s), batch_source=src, description=f"fresh windows for scenario {s!r}")
        d.sources[src.name] = src
        d.sources[push.name] = push
        fv = FeatureView(
            name=name,
            entities=[user],
            ttl=timedelta(0),  # no expiry: a window stays valid until the user's next event
            schema=[
                Field(name="item_ids", dtype=Array(String), description="last N item ids, oldest first"),
                Field(name="actions", dtype=Array(String), description="action of each event"),
                Field(name="timestamps", dtype=Array(Int64), description="unix seconds of each event"),
            ],
            source=push,
            online=True,
            description=f"user's last-N behaviour in scenario {s!r}",
            tags={"scenario": s},
        )
        seq_views.append(fv)
        d.views[name] = fv

    item_text = FeatureView(
        name=ITEM_TEXT_VIEW,
        entities=[item],
        ttl=timedelta(0),
        schema=[
            Field(name="title", dtype=String),
            Field(name="body", dtype=String),
            Field(name="tags", dtype=Array(String)),
            Field(name="scenarios", dtype=Array(String), description="scenarios the item may be shown in"),
        ],
        source=items,
        online=True,
        description="item text fields (input of the item LLM) and eligibility",
    )
    item_pop = FeatureView(
        name=ITEM_POP_VIEW,
        entities=[item],
        ttl=timedelta(0),
        schema=[Field(name="popularity", dtype=Int64, description="events on the item so far")],
        source=pop_push,
        online=True,
        description="cumulative item popularity (point-in-time)",
    )
    d.views[ITEM_TEXT_VIEW] = item_text
    d.views[ITEM_POP_VIEW] = item_pop
    d.services = {
        SERVICE_TRAINING: FeatureService(
            name=SERVICE_TRAINING, features=[*seq_views, item_text, item_pop],
            description="training rows: user history in every scenario + the target item's features",
        ),
        SERVICE_TRAINING_USER: FeatureService(
            name=SERVICE_TRAINING_USER, features=list(seq_views),
            description="training rows keyed by user only: history in every scenario",
        ),
        SERVICE_SERVING: FeatureService(
            name=SERVICE_SERVING, features=list(seq_views),
            description="online: a user's history in every scenario (merged by the user tower)",
        ),
    }
    return d
