import math

import numpy as np
import pytest

from redrec.evaluate import rank_metrics


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


def test_masked_items_never_outrank_and_ties_count_against_nobody():
    scores = np.array([-np.inf, -np.inf, 0.5, 0.5, 0.4])
    m = rank_metrics(scores, [3], ks=(1,))
    assert m["hr@1"] == 1.0  # a tie with item 2 does not push item 3 down
