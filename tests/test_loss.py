import itertools
import math

import torch
import torch.nn.functional as F
import pytest

from redrec.model.loss import (LogitScale, cosine_kmeans, full_softmax_infonce, match_targets_to_queries,
                               next_window_infonce)


def unit(*v):
    return F.normalize(torch.tensor(v, dtype=torch.float32), dim=-1)


def test_temperature_starts_at_0_07_and_scale_is_capped_at_100():
    ls = LogitScale(0.07, 100.0)
    assert float(ls().detach()) == pytest.approx(1 / 0.07)
    with torch.no_grad():
        ls.log_scale.fill_(math.log(500.0))
    s = ls()
    assert float(s.detach()) == pytest.approx(100.0)
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
    no_ids = torch.zeros(0, dtype=torch.long)
    # without item_prob in-batch negatives are never used (they would be uncorrected): only the positive is left
    loss, _ = next_window_infonce(user, targets, ids, empty, no_ids, torch.tensor(1.0), in_batch=8)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    prob = torch.tensor([0.0, 0.75, 0.25])  # item 1 is three times as frequent as item 2
    loss, _ = next_window_infonce(user, targets, ids, empty, no_ids, torch.tensor(1.0), in_batch=8, item_prob=prob)
    # logQ: no uniform draws (M=0), P=2 in-batch positives -> expected count 2 * p(item), on every logit
    lq1, lq2 = math.log(2 * 0.75), math.log(2 * 0.25)
    # sample 0: pos item 1 (cos 1.0), neg item 2 (cos 0.6); sample 1: pos item 2 (cos 0.8), neg item 1 (cos 0.0)
    l0 = math.log(math.exp(1.0 - lq1) + math.exp(0.6 - lq2)) - (1.0 - lq1)
    l1 = math.log(math.exp(0.8 - lq2) + math.exp(0.0 - lq1)) - (0.8 - lq2)
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


@pytest.mark.parametrize("K", [2, 3, 4])
def test_hungarian_matching_is_the_best_one_to_one_assignment(K):
    """Per sample, the cluster -> query assignment maximises the size-weighted centroid-query cosine
    over every permutation (brute force over K!), and is one-to-one."""
    g = torch.Generator().manual_seed(K)
    N, W, d = 40, 7, 4
    user = F.normalize(torch.randn(N, K, d, generator=g), dim=-1)
    targets = F.normalize(torch.randn(N, W, d, generator=g), dim=-1)
    mask = torch.rand(N, W, generator=g) > 0.25
    mask[:, 0] = True
    q = match_targets_to_queries(user, targets, mask)
    cluster, cent, count = cosine_kmeans(targets, mask, K)  # deterministic: the clusters the matcher used
    sim = (torch.einsum("nkd,nqd->nkq", cent, user) * count[..., None]).double()  # empty clusters: 0
    multi = conflicts = 0
    for n in range(N):
        assigned: dict[int, int] = {}
        for w in torch.nonzero(mask[n]).flatten().tolist():
            k, qq = int(cluster[n, w]), int(q[n, w])
            assert assigned.setdefault(k, qq) == qq  # every target of a cluster reads the same query
        assert len(set(assigned.values())) == len(assigned)  # distinct clusters -> distinct queries
        got = sum(float(sim[n, k, qq]) for k, qq in assigned.items())
        best = max(sum(float(sim[n, k, p[k]]) for k in range(K)) for p in itertools.permutations(range(K)))
        assert got == pytest.approx(best, abs=1e-5)
        multi += len(assigned) > 1
        greedy = [int(sim[n, k].argmax()) for k in assigned]
        conflicts += len(set(greedy)) < len(greedy)
    # the one-to-one step was exercised, including samples where each cluster's favourite query collides
    assert multi > N // 2 and conflicts > 0


def _tiny_full_softmax_problem(dtype):
    g = torch.Generator().manual_seed(0)
    M, d = 12, 4
    item_emb = F.normalize(torch.randn(M, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    item_emb[0] = 0.0  # padding row
    user = F.normalize(torch.randn(3, 2, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)  # N=3, K=2
    target_ids = torch.tensor([[1, 3, 0], [6, 9, 11], [2, 7, 0]])  # W=3, padding in samples 0 and 2
    pools = [torch.arange(1, 8), torch.arange(5, 12)]  # scenario 0: items 1..7, scenario 1: items 5..11
    eligible = torch.zeros(2, M, dtype=torch.bool)
    for s, pool in enumerate(pools):
        eligible[s, pool] = True
    sample_scen = torch.tensor([0, 1, 0])
    dup = torch.zeros(M, 2, dtype=torch.long)
    # item 4 duplicates 1 and 3 (twice in sample 0's excluded set); 10 duplicates 3 but is outside
    # pool 0; 9 is both a positive and a duplicate of 6; 1 duplicates 11 but is outside pool 1
    dup[1] = torch.tensor([4, 0])
    dup[3] = torch.tensor([4, 10])
    dup[6] = torch.tensor([9, 5])
    dup[9] = torch.tensor([6, 0])
    dup[11] = torch.tensor([1, 0])
    dup[7] = torch.tensor([4, 0])
    return user, target_ids, item_emb, pools, eligible, sample_scen, dup


def _brute_full_softmax(user, target_ids, item_emb, scale, pool_of_sample, dup):
    """Explicit loop: positive (n, w) against its matched query, denominator = exp(pos) + every pool
    item outside the sample's positives and their near-duplicates."""
    q_idx = match_targets_to_queries(user.detach(), item_emb[target_ids].detach(), target_ids > 0)
    losses = []
    for n in range(target_ids.shape[0]):
        pos_ids = [t for t in target_ids[n].tolist() if t > 0]
        excluded = set(pos_ids) | {x for t in pos_ids for x in dup[t].tolist() if x > 0}
        negs = [m for m in pool_of_sample[n] if m not in excluded]
        for w, t in enumerate(target_ids[n].tolist()):
            if t == 0:
                continue
            u = user[n, int(q_idx[n, w])]
            pos = scale * (u @ item_emb[t])
            logits = torch.stack([pos] + [scale * (u @ item_emb[m]) for m in negs])
            losses.append(torch.logsumexp(logits, 0) - pos)
    return torch.stack(losses).mean()


# scale 100 (the cap): a strong positive holds nearly all of its query's mass, where removing the
# other positives by log-space subtraction cancelled catastrophically (loss 31.0 against 29.4)
@pytest.mark.parametrize("scale_value", [5.0, 100.0], ids=["scale5", "scale100"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("scoped", [True, False], ids=["scenario-pools", "whole-catalogue"])
def test_full_softmax_equals_an_explicit_per_positive_loop(scoped, dtype, scale_value):
    user, target_ids, item_emb, pools, eligible, sample_scen, dup = _tiny_full_softmax_problem(dtype)
    user.requires_grad_(True)
    item_emb.requires_grad_(True)
    scale = torch.tensor(scale_value, dtype=dtype)
    if scoped:
        loss, stats = full_softmax_infonce(user, target_ids, item_emb, scale, sample_scen=sample_scen, pools=pools,
                                           eligible=eligible, duplicates=dup)
        pool_of_sample = [pools[s].tolist() for s in sample_scen.tolist()]
    else:
        loss, stats = full_softmax_infonce(user, target_ids, item_emb, scale, duplicates=dup)
        pool_of_sample = [list(range(1, item_emb.shape[0]))] * 3
    ref = _brute_full_softmax(user, target_ids, item_emb, scale, pool_of_sample, dup)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    assert stats["positives"] == 7
    # gradients reach both towers, and equal the reference's
    g_user, g_item = torch.autograd.grad(loss, [user, item_emb])
    r_user, r_item = torch.autograd.grad(ref, [user, item_emb])
    assert g_user.abs().sum() > 0 and g_item.abs().sum() > 0
    if scale_value < 10:  # at the cap a well-ranked positive's gradient underflows to exactly 0
        assert (g_item[target_ids[target_ids > 0]].abs().sum(-1) > 0).all()  # every target row learns
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert torch.allclose(g_user, r_user, atol=tol) and torch.allclose(g_item, r_item, atol=tol)


def test_full_softmax_targets_come_from_the_item_side():
    user, target_ids, item_emb, pools, eligible, sample_scen, dup = _tiny_full_softmax_problem(torch.float64)
    scale = torch.tensor(5.0, dtype=torch.float64)

    def loss_of(emb):
        return float(full_softmax_infonce(user, target_ids, emb, scale, sample_scen=sample_scen, pools=pools,
                                          eligible=eligible, duplicates=dup)[0])

    base = loss_of(item_emb)
    # a target row leaves every denominator (it is one of its sample's positives), so moving it
    # changes the loss only through the positive logit read from the item table
    moved = item_emb.clone()
    moved[9] = F.normalize(torch.tensor([1.0, -2.0, 0.5, 1.0], dtype=torch.float64), dim=0)
    assert abs(loss_of(moved) - base) > 1e-3
    # item 4 is a near-duplicate of a positive in every sample whose pool holds it: it never counts
    moved = item_emb.clone()
    moved[4] = -moved[4]
    assert loss_of(moved) == pytest.approx(base, rel=1e-9)


@pytest.mark.parametrize("path", ["full", "sampled"])
def test_recmodel_positive_logits_read_the_item_embeddings_of_the_targets(path):
    from redrec.model.recommender import ModelConfig, RecModel
    from redrec.model.user_tower import UserTowerConfig

    torch.manual_seed(0)
    cfg = ModelConfig(variant="redrec", item_source="id", n_items=12, scenarios=["a", "b"], actions=["x"], dim=8, window=2,
                      user_tower=UserTowerConfig(hidden_size=16, layers=1, heads=2, max_len=8, dropout=0.0)).for_variant()
    model = RecModel(cfg)
    z = torch.zeros(2, 4, dtype=torch.long)
    batch = {"items": torch.tensor([[1, 2, 3, 4], [2, 3, 4, 0]]), "scen": z, "act": z, "hour": z,
             "spos": torch.arange(4).expand(2, 4), "length": torch.tensor([4, 3]),
             "cut": torch.tensor([[2, 4], [3, 3]]), "cut_scen": torch.tensor([[0, 1], [0, 1]]),
             "cut_valid": torch.ones(2, 2, dtype=torch.bool),
             "targets": torch.tensor([[[5, 6], [7, 8]], [[6, 5], [8, 7]]])}  # none of them in a history
    # disjoint pools (a: 1..6, b: 7..12) and every sample of a scenario has the same positives: the
    # target rows leave every denominator that holds them, so they act through the positive logits only
    eligible = torch.zeros(2, 13, dtype=torch.bool)
    eligible[0, 1:7] = True
    eligible[1, 7:13] = True
    kw = {} if path == "full" else {"negative_ids": torch.tensor([1, 2, 3, 4, 12])}  # no target among them

    def run():
        with torch.no_grad():
            return model.user_vectors(batch), float(model.loss(batch, eligible, **kw)[0])

    u0, l0 = run()
    with torch.no_grad():
        model.item_table.weight[5:9] += 0.5 * torch.randn(4, 16)
    u1, l1 = run()
    assert torch.equal(u0, u1)  # the user tower is untouched: it reads only the histories
    assert abs(l1 - l0) > 1e-4


def test_logq_lowers_each_logit_by_its_expected_count_and_spares_popular_negatives():
    """Three samples, one positive each, one uniform negative (M=1 drawn from n=20 catalogue items),
    in-batch negatives on with P=3 positives: item i's logits drop by log(M/n + P * p_i)."""
    e = torch.eye(3)
    user = e[:, None].clone().requires_grad_(True)  # sample j's single query is e_j
    targets = e[:, None].clone()  # sample 0 -> item 2 (rare), sample 1 -> item 1 (popular), sample 2 -> item 3 (rare)
    ids = torch.tensor([[2], [1], [3]])
    negs, neg_ids = -e[:1], torch.tensor([4])
    prob = torch.zeros(11)
    prob[1], prob[2], prob[3], prob[4] = 0.5, 0.1, 0.05, 0.02
    s = 2.0
    loss, _ = next_window_infonce(user, targets, ids, negs, neg_ids, torch.tensor(s), in_batch=8, item_prob=prob, n_catalogue=20)
    lq = {i: math.log(1 / 20 + 3 * float(prob[i])) for i in (1, 2, 3, 4)}

    def sample(pos_item, cos):  # cos: item -> cosine with this sample's query (the sample's own item is masked)
        pos = s * cos[pos_item] - lq[pos_item]
        return math.log(sum(math.exp(s * c - lq[i]) for i, c in cos.items())) - pos

    expected = (sample(2, {2: 1.0, 1: 0.0, 3: 0.0, 4: -1.0}) + sample(1, {1: 1.0, 2: 0.0, 3: 0.0, 4: 0.0})
                + sample(3, {3: 1.0, 1: 0.0, 2: 0.0, 4: 0.0})) / 3
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    # sample 0 sees item 1 (popular, along e_1) and item 3 (rare, along e_2) at the same cosine 0: the
    # gradient on its query along each is its softmax weight, uncorrected they would be equal
    loss.backward()
    w_pop, w_rare = float(user.grad[0, 0, 1]), float(user.grad[0, 0, 2])
    assert 0 < w_pop < w_rare
    assert w_pop / w_rare == pytest.approx((1 / 20 + 3 * 0.05) / (1 / 20 + 3 * 0.5), rel=1e-5)
