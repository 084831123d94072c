import numpy as np
import pandas as pd
import pytest

from redrec.data import chronological_split, encode, leave_one_out_split, load_dataset
from redrec.data.dataset import RecData
from redrec.data.movielens import scenario_of
from redrec.data.parquet import load_parquet, save_parquet
from redrec.data.synthetic import SyntheticConfig, generate
from redrec.schema import SchemaError


@pytest.fixture(scope="module")
def ml1m():
    return load_dataset("movielens-1m")


def test_movielens_loads_everything_from_the_wheel(ml1m):
    d = ml1m.describe()
    assert d["events"] == 1_000_209 and d["users"] == 6040 and d["items"] == 3883
    assert all(r.rows_in == r.rows_kept for r in ml1m.reports)  # nothing dropped, silently or not


def test_movielens_scenarios_have_disjoint_pools_and_follow_the_rule(ml1m):
    pools = {s: set(ml1m.items.loc[ml1m.items["scenarios"].map(lambda x: s in x), "item_id"]) for s in ml1m.scenarios}
    assert all(len(p) > 300 for p in pools.values())
    assert not (pools["ads"] & pools["homefeed"]) and not (pools["search"] & pools["homefeed"]) and not (pools["ads"] & pools["search"])
    ev = ml1m.events.sample(2000, random_state=0)
    for iid, scen in zip(ev["item_id"], ev["scenario"]):
        assert iid in pools[scen]
    assert scenario_of("Toy Story (1995)", 1995.0) == scenario_of("Toy Story (1995)", 1995.0)
    assert set(ml1m.events["action"]) == {"skip", "click", "like", "share"}


def test_movielens_sort_is_stable_for_equal_timestamps(ml1m):
    ev = ml1m.events
    u1 = ev[ev["user_id"] == "1m_1"]
    assert (np.diff(u1["ts"].to_numpy()) >= 0).all()
    # equal timestamps keep the file's order (the raw file lists user 1's ratings in this order)
    dup = u1[u1["ts"].duplicated(keep=False)]
    assert len(dup) > 0


def test_stable_sort_keeps_input_order_on_ties():
    ev = pd.DataFrame({"user_id": ["u"] * 4, "item_id": ["c", "a", "b", "d"], "scenario": ["s"] * 4, "action": ["x"] * 4, "ts": [5, 1, 5, 5]})
    items = pd.DataFrame({"item_id": list("abcd"), "title": list("abcd"), "body": "", "tags": [[]] * 4, "scenarios": [["s"]] * 4, "image": None})
    d = RecData("t", ev, items, ["s"], ["x"])
    assert d.events["item_id"].tolist() == ["a", "c", "b", "d"]


def test_synthetic_is_seedable_and_multiscenario():
    a = generate(SyntheticConfig(n_users=50, n_items=100, seed=7))
    b = generate(SyntheticConfig(n_users=50, n_items=100, seed=7))
    c = generate(SyntheticConfig(n_users=50, n_items=100, seed=8))
    pd.testing.assert_frame_equal(a.events, b.events)
    assert not a.events.equals(c.events)
    assert set(a.events["scenario"]) == {"homefeed", "search", "ads"}
    ads_pool = set(a.items.loc[a.items["scenarios"].map(lambda s: "ads" in s), "item_id"])
    feed_pool = set(a.items.loc[a.items["scenarios"].map(lambda s: "homefeed" in s), "item_id"])
    assert ads_pool != feed_pool and ads_pool - feed_pool  # ads-only items exist
    enc = encode(a)
    for s in range(3):  # every event's item is eligible in its scenario
        m = enc.scenario == s
        assert enc.eligible[s, enc.item[m]].all()


def test_parquet_adapter_roundtrip_and_errors(tmp_path, synthetic_small):
    ev, it = save_parquet(synthetic_small, tmp_path)
    d = load_parquet(ev, it)
    assert len(d.events) == len(synthetic_small.events) and d.scenarios == ["homefeed", "search", "ads"]
    bad = synthetic_small.events.copy()
    bad.loc[3, "item_id"] = "nope"
    bad.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(SchemaError, match=r"bad.parquet: row 3, field 'item_id'"):
        load_parquet(tmp_path / "bad.parquet", it)
    d2 = load_parquet(tmp_path / "bad.parquet", it, on_error="drop")
    assert d2.reports[1].dropped == {"unknown item": 1}


def test_chronological_split_windows(synthetic_small):
    enc = encode(synthetic_small)
    sp = chronological_split(enc, test_events=5, valid_events=5)
    n = np.diff(enc.offsets)
    long_ = n >= 13
    assert ((enc.offsets[1:] - sp.valid_end)[long_] == 5).all()
    assert ((sp.valid_end - sp.train_end)[long_] == 5).all()
    assert (sp.train_end[~long_] == enc.offsets[1:][~long_]).all()  # short users keep everything in train
    # test events come after every train event of the same user
    for u in np.flatnonzero(long_)[:20]:
        assert enc.ts[sp.train_end[u] - 1] <= enc.ts[sp.valid_end[u]]
    loo = leave_one_out_split(enc)
    assert ((enc.offsets[1:] - loo.valid_end)[long_] == 1).all()
