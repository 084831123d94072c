"""The new-items (item cold start) protocol, its baselines (new-item popularity, content kNN) and
SASRec over text-initialised items."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from redrec.data import encode, load_dataset
from redrec.data.dataset import EncodedData
from redrec.data.split import Split, new_items_split
from redrec.evaluate import eval_tasks, evaluate_content_knn, evaluate_new_item_popularity
from redrec.experiment import MODELS, ExperimentConfig, build_model_config, collapse_scenarios, run_protocol
from redrec.model.recommender import ModelConfig, RecModel
from redrec.train.batches import BatchBuilder

FRAC = 0.15


@pytest.fixture(scope="module")
def arrivals():
    """A synthetic log where part of the catalogue is released late (otherwise nothing is new)."""
    return collapse_scenarios(load_dataset("synthetic", n_users=300, n_items=200, seed=3, new_item_share=0.15))


def test_no_new_item_is_trained_on_or_validated_and_each_test_is_the_first_new_item_event(arrivals):
    enc = encode(arrivals)
    split, cutoff, is_new = new_items_split(enc, FRAC)
    # the cut-off leaves about the last FRAC of events at or after it
    assert FRAC <= (enc.ts >= cutoff).mean() < FRAC + 0.01
    first = {i: enc.ts[enc.item == i].min() for i in np.unique(enc.item)}
    assert all((first[i] >= cutoff) == is_new[i] for i in first)
    tested = split.users_with_test(enc)
    assert len(tested) >= 15 and is_new.sum() >= 10
    for u in range(enc.n_users):
        start = enc.offsets[u]
        assert not is_new[enc.item[start : split.train_end[u]]].any(), u
        assert not is_new[enc.item[split.train_end[u] : split.valid_end[u]]].any(), u
    for u in tested:
        start, q = enc.offsets[u], split.valid_end[u]
        assert split.test_end[u] == q + 1 and is_new[enc.item[q]] and enc.ts[q] >= cutoff
        assert not is_new[enc.item[start:q]].any()  # the user's first new-item event: the history is warm
        assert split.valid_end[u] - split.train_end[u] == 1
    # the evaluation reads exactly that event, with everything before it as history
    tasks = eval_tasks(enc, split, "test")
    assert sorted(t.user for t in tasks) == sorted(tested.tolist())
    for t in tasks:
        assert t.history_end == split.valid_end[t.user] and t.targets == [int(enc.item[t.history_end])]
    # training sequences and their targets (what the trainer reads) hold no new item either
    builder = BatchBuilder(enc, max_len=20, window=1)
    seen = set()
    for batch in builder.train_batches(split.train_end, 32, 0, seed=0, epoch=0):
        seen |= set(batch["items"].flatten().tolist()) | set(batch["targets"].flatten().tolist())
    assert seen and not is_new[sorted(seen)].any()


def _tiny(out_dir, variants, **over) -> ExperimentConfig:
    return ExperimentConfig.model_validate({
        "dataset": "synthetic", "variants": variants, "new_items_frac": FRAC,
        "model": {"item_source": "cache-finetune", "user_tower": {"hidden_size": 32, "layers": 1, "heads": 2, "max_len": 20}},
        "train": {"epochs": 2, "batch_size": 32, "progress": False, "warmup_steps": 2, "weight_decay": 0.0},
        "out_dir": str(out_dir), **over})


def test_new_items_protocol_gives_new_items_no_gradient_and_ranks_them(tmp_path, arrivals):
    """The id table's rows of new items end training as they started: they were neither targets
    nor softmax negatives (weight decay off, the only other thing that moves a row)."""
    cfg = _tiny(tmp_path, ["sasrec"])
    out = run_protocol(cfg, "new-items", arrivals, log=lambda *_: None)
    assert {"popularity", "new-item-popularity", "content-knn", "sasrec"} <= set(out["results"])
    assert out["results"]["sasrec"]["counts"]["overall"] == out["test_users"] > 0
    # the training popularity never saw a new item: it can only place them by tie-break
    assert out["results"]["popularity"]["overall"]["hr@10"] == 0.0
    enc = encode(arrivals)
    _, _, is_new = new_items_split(enc, FRAC)
    mcfg = build_model_config(cfg.model, "sasrec", arrivals, enc.n_items)
    torch.manual_seed(cfg.train.seed)
    init = RecModel(mcfg).state_dict()["item_table.weight"]
    trained = torch.load(tmp_path / "new-items" / "sasrec" / "best_model.pt", weights_only=True)["item_table.weight"]
    new, warm = torch.from_numpy(is_new), torch.from_numpy(~is_new)
    warm[0] = False
    assert torch.equal(trained[new], init[new])
    assert not torch.allclose(trained[warm], init[warm])


def test_sasrec_text_differs_from_sasrec_only_in_item_source(arrivals):
    for source, want in (("cache-finetune", "cache-finetune"), ("cache-frozen", "cache-frozen"), ("id", "cache-finetune")):
        template = ModelConfig(item_source=source)
        sas = build_model_config(template, "sasrec", arrivals, 200).model_dump()
        text = build_model_config(template, "sasrec-text", arrivals, 200).model_dump()
        assert sas["item_source"] == "id" and text["item_source"] == want
        assert {k for k in sas if sas[k] != text[k]} == {"item_source"}
    assert MODELS["sasrec-text"][0] == "sasrec"


@pytest.mark.parametrize("protocol", ["multi-scenario", "loo", "new-items"])
def test_sasrec_text_trains_in_every_protocol(tmp_path, protocol):
    data = load_dataset("synthetic", n_users=200, n_items=150, seed=3, new_item_share=0.15)
    cfg = _tiny(tmp_path, ["sasrec-text"], train={"epochs": 1, "batch_size": 32, "progress": False, "warmup_steps": 2})
    out = run_protocol(cfg, protocol, data, log=lambda *_: None)
    assert out["models"]["sasrec-text"]["config"]["item_source"] == "cache-finetune"
    assert out["results"]["sasrec-text"]["counts"]["overall"] > 0


def _log(items_per_user: list[list[int]], n_items: int, ts_per_user: list[list[int]] | None = None) -> EncodedData:
    lengths = [len(x) for x in items_per_user]
    ts = ts_per_user or [list(range(len(x))) for x in items_per_user]
    return EncodedData(item_ids=[f"i{i}" for i in range(1, n_items + 1)], user_ids=[f"u{u}" for u in range(len(lengths))],
                       scenarios=["all"], actions=["x"], offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                       item=np.concatenate(items_per_user).astype(np.int64), scenario=np.zeros(sum(lengths), np.int64),
                       action=np.zeros(sum(lengths), np.int64), ts=np.concatenate(ts).astype(np.int64),
                       eligible=np.ones((1, n_items + 1), dtype=bool))


def test_content_knn_ranks_the_textual_neighbour_of_a_users_history_first():
    """Item 1's neighbours (2, 3, 4) make up the recent history: item 1 must come first, ahead of
    a long vector (5) that an unnormalised dot product would prefer and of the topic the user left
    (6..9, beyond last_n, whose centre is item 10). Scores are cosines of unit vectors."""
    rng = np.random.default_rng(0)
    D, n = 32, 30
    eye = np.eye(D)
    vecs = np.zeros((n + 1, D))
    vecs[1:] = rng.normal(size=(n, D))
    vecs[1] = eye[0]
    for i in (2, 3, 4):
        vecs[i] = eye[0] + 0.3 * eye[2 + i]
    vecs[5] = 50 * (0.6 * eye[0] + 0.8 * eye[3])
    for i in (6, 7, 8, 9):
        vecs[i] = eye[1] + 0.3 * eye[10 + i]
    vecs[10] = eye[1]
    # user 0: the old topic twice, then 2, 3, 4, 4; the test is item 1. User 1 has no test.
    enc = _log([[6, 7, 8, 9, 6, 7, 8, 9, 2, 3, 4, 4, 1], [12, 13, 14, 15, 16]], n)
    split = Split(train_end=np.array([12, 18]), valid_end=np.array([12, 18]), protocol="t", test_end=np.array([13, 18]))
    res = evaluate_content_knn(enc, split, vecs, last_n=4)
    assert res.counts["overall"] == 1 and res.overall["mrr"] == 1.0
    # the whole history: the old topic (8 events of 12) pulls the mean, and item 10 wins
    assert evaluate_content_knn(enc, split, vecs, last_n=50).overall["mrr"] < 1.0
    with pytest.raises(ValueError, match="n_items \\+ 1"):
        evaluate_content_knn(enc, split, vecs[1:])


def test_content_vectors_follow_the_encoded_item_order(synthetic_small):
    from redrec.experiment import content_vectors
    from redrec.model.item_tower import ItemTowerConfig, cached_item_reps

    enc = encode(synthetic_small)
    vecs = content_vectors(synthetic_small)
    assert enc.item_ids == synthetic_small.items["item_id"].tolist()
    reps = cached_item_reps(synthetic_small.items, ItemTowerConfig(backbone="minilm"), __import__("os").environ["REDREC_CACHE"])
    assert vecs.shape == (enc.n_items + 1, reps.shape[1]) and not vecs[0].any() and np.array_equal(vecs[1:], reps)


def test_new_item_popularity_ranks_new_items_by_their_first_hours_without_the_test_events():
    """Cut-off at hour 100, 24 h windows. New items (first event at/after hour 100): 20 (first at
    100 h: user 0's test, then users 2 and 3 in its window), 21 (104 h, one more at 200 h, outside
    its window), 22 (only user 1's test), 23 (one event) and 24 (first at 300 h, two events in its
    own first day, none in the day after T). User 0's target 20 ranks first; user 1's target 22
    counts nothing (its own test event does not count) and comes after 20, 24, 21 and 23."""
    h = 3600
    enc = _log([[1, 2, 3, 4, 20], [1, 2, 3, 5, 22], [20], [20], [21, 21], [23], [24], [24]], 30,
               [[0, 1, 2, 3, 100 * h], [0, 1, 2, 3, 101 * h], [102 * h], [103 * h], [104 * h, 200 * h], [105 * h], [300 * h], [301 * h]])
    test = np.array([4, 9] + [-1] * 6)
    has = test >= 0
    valid_end = np.where(has, test, enc.offsets[1:])
    train_end = np.where(has, test - 1, enc.offsets[1:])
    # the events of 23 and 24 are validation, not training: their training count (the tie-break) is 0, as 22's
    train_end[5:] = enc.offsets[5:-1]
    split = Split(train_end=train_end, valid_end=valid_end, protocol="t", test_end=np.where(has, test + 1, valid_end))
    res = evaluate_new_item_popularity(enc, split, cutoff=100 * h, hours=24)
    assert res.counts["overall"] == 2
    # counting user 1's own test would tie 22 with 23 and put it 4th (lower index first); a window
    # of the 24 h after T for every item would leave 24 at 0 and 22 4th as well
    assert res.overall["mrr"] == pytest.approx((1 + 1 / 5) / 2)
