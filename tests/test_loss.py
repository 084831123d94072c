import math

import torch
import torch.nn.functional as F
import pytest

from redrec.model.loss import LogitScale, cosine_kmeans, match_targets_to_queries, next_window_infonce


def unit(*v):
    return F.normalize(torch.tensor(v, dtype=torch.float32), dim=-1)


def test_temperature_starts_at_0_07_and_scale_is_capped_at_100():
    ls = LogitScale(0.07, 100.0)
    assert float(ls().detach()) == pytest.approx(1 / 0.07)
    with torch.no_grad():
        ls.log_scale.fill_(math.log(500.0))
    s = ls()
    assert float(s) == pytest.approx(100.0)
    s.backward()
    assert float(ls.log_scale.grad.abs().sum()) == 0.0  # past the cap the scale stops learning upward


def test_masking_same_item_near_duplicate_and_ineligible():
    user = unit(1.0, 0.0)[None, None]  # N=1, K=1
    targets = unit(1.0, 0.0)[None, None]  # W=1
    target_ids = torch.tensor([[5]])
    negs = torch.stack([unit(1.0, 0.0), unit(0.999, 0.04), unit(0.0, 1.0), unit(-1.0, 0.0)])
    neg_ids = torch.tensor([5, 6, 7, 8])
    eligible = torch.ones(1, 10, dtype=torch.bool)
    eligible[0, 8] = False
    # the near-duplicate test reads fixed reference vectors: item 6 duplicates item 5 there
    ref = torch.zeros(10, 2)
    ref[:, 1] = 1.0
    ref[5], ref[6] = unit(1.0, 0.0), unit(0.995, 0.1)
    loss, stats = next_window_infonce(user, targets, target_ids, negs, neg_ids, torch.tensor(2.0),
                                      eligible=eligible, sample_scen=torch.tensor([0]), in_batch=0, dup_ref=ref)
    # only item 7 (cosine 0) survives: loss = log(e^2 + e^0) - 2
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-5)
    assert stats["masked_negatives"] == pytest.approx(0.75)


def test_near_duplicate_mask_ignores_the_learned_vectors():
    """Collapsed learned embeddings must not mask their negatives away (the loss would reward collapse)."""
    user = unit(1.0, 0.0)[None, None]
    targets = unit(1.0, 0.0)[None, None]
    negs = unit(1.0, 0.0)[None]  # learned negative identical to the target
    ref = torch.eye(10, 2)  # but different items by their content: ids 0 and 1 differ, 2.. are zero
    ref[3], ref[4] = unit(1.0, 0.0), unit(0.0, 1.0)
    loss, stats = next_window_infonce(user, targets, torch.tensor([[3]]), negs, torch.tensor([4]), torch.tensor(1.0),
                                      in_batch=0, dup_ref=ref)
    assert stats["masked_negatives"] == 0.0
    assert float(loss) == pytest.approx(math.log(2.0), rel=1e-5)


def test_in_batch_positives_are_negatives_for_the_other_samples():
    user = torch.stack([unit(1.0, 0.0), unit(0.0, 1.0)])[:, None]  # N=2, K=1
    targets = torch.stack([unit(1.0, 0.0), unit(0.6, 0.8)])[:, None]
    ids = torch.tensor([[1], [2]])
    empty = torch.zeros(0, 2)
    loss, _ = next_window_infonce(user, targets, ids, empty, torch.zeros(0, dtype=torch.long), torch.tensor(1.0), in_batch=8)
    # sample 0: pos 1.0, neg = target of sample 1 -> cos 0.6; sample 1: pos 0.8, neg cos 0.0
    l0 = math.log(math.exp(1.0) + math.exp(0.6)) - 1.0
    l1 = math.log(math.exp(0.8) + math.exp(0.0)) - 0.8
    assert float(loss) == pytest.approx((l0 + l1) / 2, rel=1e-5)


def test_padding_targets_do_not_count():
    user = unit(1.0, 0.0)[None, None]
    targets = torch.stack([unit(1.0, 0.0), unit(0.0, 1.0)])[None]
    negs = unit(0.0, 1.0)[None]
    l_pad, st = next_window_infonce(user, targets, torch.tensor([[3, 0]]), negs, torch.tensor([9]), torch.tensor(1.0), in_batch=0)
    l_one, _ = next_window_infonce(user, targets[:, :1], torch.tensor([[3]]), negs, torch.tensor([9]), torch.tensor(1.0), in_batch=0)
    assert float(l_pad) == pytest.approx(float(l_one)) and st["positives"] == 1


def test_kmeans_then_one_to_one_assignment_to_queries():
    targets = torch.stack([unit(1.0, 0.1), unit(1.0, -0.1), unit(0.1, 1.0), unit(-0.1, 1.0)])[None]
    mask = torch.ones(1, 4, dtype=torch.bool)
    cluster, _, count = cosine_kmeans(targets, mask, 2)
    assert count.tolist() == [[2.0, 2.0]]
    assert cluster[0, 0] == cluster[0, 1] != cluster[0, 2] == cluster[0, 3]
    queries = torch.stack([unit(0.0, 1.0), unit(1.0, 0.0)])[None]  # query 0 points "up", query 1 "right"
    assert match_targets_to_queries(queries, targets, mask).tolist() == [[1, 1, 0, 0]]
    # even when both clusters prefer the same query, assignment stays one-to-one
    queries = torch.stack([unit(1.0, 1.0), unit(-1.0, -1.0)])[None]
    q = match_targets_to_queries(queries, targets, mask)[0]
    assert q[0] == q[1] and q[2] == q[3] and q[0] != q[2]


def test_positive_matched_to_its_query_drives_the_loss():
    # two queries; the positive is close to query 1: the loss must use query 1, not the mean
    user = torch.stack([unit(0.0, 1.0), unit(1.0, 0.0)])[None]
    targets = torch.stack([unit(1.0, 0.0), unit(1.0, 0.0)])[None]
    loss, _ = next_window_infonce(user, targets, torch.tensor([[4, 4]]), unit(0.0, 1.0)[None], torch.tensor([9]), torch.tensor(1.0), in_batch=0)
    assert float(loss) == pytest.approx(math.log(math.exp(1.0) + math.exp(0.0)) - 1.0, rel=1e-5)
