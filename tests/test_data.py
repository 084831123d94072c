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


def _hand_encoded(lengths):
    """EncodedData with users of the given lengths; user u's events carry items 100*u + 1, 100*u + 2, ..."""
    from redrec.data.dataset import EncodedData

    items = np.concatenate([100 * u + 1 + np.arange(n) for u, n in enumerate(lengths)]).astype(np.int64)
    ts = np.concatenate([np.arange(n) * 10 for n in lengths]).astype(np.int64)
    n_items = int(items.max())
    return EncodedData(item_ids=[f"i{i}" for i in range(1, n_items + 1)], user_ids=[f"u{u}" for u in range(len(lengths))],
                       scenarios=["s"], actions=["x"], offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                       item=items, scenario=np.zeros(len(items), np.int64), action=np.zeros(len(items), np.int64), ts=ts,
                       eligible=np.ones((1, n_items + 1), dtype=bool))


@pytest.mark.parametrize("min_train", [3, 1])
def test_leave_one_out_split_on_a_hand_made_log(min_train):
    lengths = [7, 5, 4, 1, 2, 3]
    enc = _hand_encoded(lengths)
    sp = leave_one_out_split(enc, min_train=min_train)
    for u, n in enumerate(lengths):
        a, b = int(enc.offsets[u]), int(enc.offsets[u + 1])
        own = (100 * u + 1 + np.arange(n)).tolist()
        train, valid, test = (enc.item[a : sp.train_end[u]].tolist(), enc.item[sp.train_end[u] : sp.valid_end[u]].tolist(),
                              enc.item[sp.valid_end[u] : b].tolist())
        if n >= min_train + 2:  # test = the last event, valid = the one before, train = everything before
            assert (train, valid, test) == (own[:-2], [own[-2]], [own[-1]]), u
        else:  # too short: everything stays in train
            assert (train, valid, test) == (own, [], []), u
    n = np.asarray(lengths)
    assert sp.users_with_test(enc).tolist() == np.flatnonzero(n >= min_train + 2).tolist()


def test_leave_one_out_split_on_synthetic_users():
    enc = encode(load_dataset("synthetic", n_users=40, n_items=60, seed=1))
    sp = leave_one_out_split(enc)
    start, end = enc.offsets[:-1], enc.offsets[1:]
    long_ = end - start >= 5
    assert long_.any() and (end - start > 0).all()
    assert (sp.valid_end[long_] == end[long_] - 1).all() and (sp.train_end[long_] == end[long_] - 2).all()
    assert (sp.train_end[~long_] == end[~long_]).all() and (sp.valid_end[~long_] == end[~long_]).all()
    for u in np.flatnonzero(long_):  # the test event is the user's latest (time-sorted, stable on ties)
        assert enc.ts[sp.valid_end[u]] == enc.ts[start[u] : end[u]].max()


def test_collapse_scenarios_gives_one_scenario_with_every_item_eligible(synthetic_small):
    from redrec.experiment import COLLAPSED, collapse_scenarios

    before = synthetic_small.events.copy()
    flat = collapse_scenarios(synthetic_small)
    assert flat.scenarios == [COLLAPSED] == ["all"]
    assert (flat.events["scenario"] == "all").all()
    assert flat.items["scenarios"].map(lambda s: list(s) == ["all"]).all()
    rest = [c for c in before.columns if c != "scenario"]
    pd.testing.assert_frame_equal(flat.events[rest], before[rest])  # same events, same order, same fields
    pd.testing.assert_frame_equal(flat.items.drop(columns="scenarios"), synthetic_small.items.drop(columns="scenarios"))
    assert flat.actions == synthetic_small.actions and flat.name == synthetic_small.name
    pd.testing.assert_frame_equal(synthetic_small.events, before)  # the input is not modified
    assert len(synthetic_small.scenarios) == 3
    enc, enc0 = encode(flat), encode(synthetic_small)
    assert enc.eligible.shape == (1, enc.n_items + 1) and enc.eligible[0, 1:].all() and not enc.eligible[0, 0]
    assert (enc.scenario == 0).all()
    for f in ("item", "action", "ts", "offsets"):
        assert np.array_equal(getattr(enc, f), getattr(enc0, f)), f
    assert enc.user_ids == enc0.user_ids and enc.item_ids == enc0.item_ids
