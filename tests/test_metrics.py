import math

import numpy as np
import pytest
import torch

from redrec.evaluate import _batch_ranks, metrics_from_ranks, rank_metrics


def test_single_target_rank_3():
    scores = np.array([-np.inf, 0.9, 0.8, 0.7, 0.1])  # item 3 ranks third
    m = rank_metrics(scores, [3], ks=(2, 10))
    assert m["hr@2"] == 0 and m["hr@10"] == 1
    assert m["ndcg@10"] == pytest.approx(1 / math.log2(4))
    assert m["mrr"] == pytest.approx(1 / 3)


def test_multiple_targets_ideal_dcg_over_min_k_targets():
    scores = np.array([-np.inf, 0.9, 0.8, 0.7, 0.6, 0.5])
    m = rank_metrics(scores, [1, 3, 5], ks=(2, 10))
    # ranks 1, 3, 5; @2 only rank 1 counts, ideal over min(2, 3) = 2 positions
    assert m["ndcg@2"] == pytest.approx(1.0 / (1 + 1 / math.log2(3)))
    dcg10 = 1 + 1 / math.log2(4) + 1 / math.log2(6)
    idcg10 = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg@10"] == pytest.approx(dcg10 / idcg10)
    assert m["mrr"] == 1.0 and m["hr@2"] == 1.0


def test_masked_items_never_outrank_and_ties_count_against_the_target():
    scores = np.array([-np.inf, -np.inf, 0.5, 0.5, 0.4])
    m = rank_metrics(scores, [3], ks=(1, 2))
    # masked items 0 and 1 stay below; the tie with item 2 pushes item 3 down to rank 2
    assert m["hr@1"] == 0.0 and m["hr@2"] == 1.0
    assert m["mrr"] == pytest.approx(1 / 2)
    assert m["ndcg@2"] == pytest.approx(1 / math.log2(3))
    # a tie is pessimistic whichever of the tied items is the target
    assert rank_metrics(scores, [2], ks=(1,))["mrr"] == pytest.approx(1 / 2)


def test_a_constant_scorer_gets_about_nothing():
    scores = np.full(1001, 0.3)
    scores[0] = -np.inf  # padding
    m = rank_metrics(scores, [417], ks=(10,))
    assert m["ndcg@10"] < 0.01 and m["hr@10"] == 0.0
    assert m["mrr"] == pytest.approx(1 / 1000)  # ranked behind every one of its 999 ties


def test_a_nan_scorer_gets_about_nothing():
    scores = np.full(1001, np.nan)
    scores[0] = -np.inf
    m = rank_metrics(scores, [417], ks=(10,))
    assert m["ndcg@10"] < 0.01 and m["hr@10"] == 0.0
    assert m["mrr"] == pytest.approx(1 / 1000)


def test_a_nan_target_ranks_last_and_a_nan_elsewhere_outranks():
    scores = np.array([-np.inf, 0.9, np.nan, 0.1, -np.inf, 0.5])
    assert rank_metrics(scores, [2])["mrr"] == pytest.approx(1 / 4)  # last of the 4 unmasked candidates
    assert rank_metrics(scores, [3])["mrr"] == pytest.approx(1 / 4)  # below 0.9, 0.5 and the NaN
    assert rank_metrics(scores, [1])["mrr"] == pytest.approx(1 / 2)  # only the NaN is "above" 0.9


def test_batch_ranks_agree_with_rank_metrics_on_ties_nans_and_masks():
    rng = np.random.default_rng(0)
    B, M = 40, 30
    scores = rng.integers(0, 6, size=(B, M)).astype(np.float64) / 5  # few distinct values: many ties
    scores[rng.random((B, M)) < 0.1] = np.nan
    scores[rng.random((B, M)) < 0.2] = -np.inf
    scores[:, 0] = -np.inf
    scores[0] = np.nan  # a NaN scorer
    scores[1, 1:] = 0.5  # a constant scorer
    targets = [sorted(rng.choice(np.arange(1, M), size=int(rng.integers(1, 5)), replace=False).tolist()) for _ in range(B)]
    ranks = _batch_ranks(torch.from_numpy(scores), targets)
    n_nan_targets = 0
    for b in range(B):
        assert len(ranks[b]) == len(targets[b])
        for t, r in zip(targets[b], ranks[b]):
            # rank_metrics of the single target t: its mrr is 1 / rank
            assert int(r) == round(1 / rank_metrics(scores[b], [t])["mrr"]), (b, t)
            n_nan_targets += bool(np.isnan(scores[b, t]))
        assert metrics_from_ranks(ranks[b], len(targets[b])) == pytest.approx(rank_metrics(scores[b], targets[b]))
    assert n_nan_targets > 0



def test_evaluation_table_fits_100_columns():
    from redrec.evaluate import EvalResult, format_table

    scen = ["homefeed", "search", "ads", "live"]
    res = {name: EvalResult(overall={"ndcg@10": 0.1, "hr@10": 0.2, "mrr": 0.05},
                            per_scenario={s: {"ndcg@10": 0.1, "hr@10": 0.2, "mrr": 0.05} for s in scen})
           for name in ("popularity", "sasrec", "redrec-single-scenario", "redrec")}
    table = format_table(res, scen, ref="popularity")
    lines = table.splitlines()
    assert max(map(len, lines)) <= 100, table
    assert len(lines) == 2 + 4 * 5 and "redrec-single-scenario" in table and "1.00x" in table
