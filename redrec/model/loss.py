"""Next-window InfoNCE with scenario queries (DESIGN.md, "Loss").

For each (user, cut, scenario) sample the positives are the user's next W items in that scenario;
each positive is matched to one of the K query vectors (cosine k-means on the targets, then an
optimal cluster->query assignment). Negatives are the whole eligible catalogue when it fits
(``full_softmax_infonce``); above a configurable catalogue size, catalogue items sampled once
and shared by the whole batch plus the other samples' positives, with logQ correction
(``next_window_infonce``). A negative equal to one of the sample's positives, ineligible in the
sample's scenario, or with cosine > ``false_negative_cos`` to the positive is masked. That cosine is taken on fixed reference vectors (the item LLM's cached
text embeddings), never on the embeddings being learned: masked negatives lower the loss, so a
mask computed on learned vectors rewards collapsing every item onto one point (an id-only model
has no such vectors and masks same-id negatives only). The logit scale is learnable, starts at
1/0.07 and is capped at 100.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NEG_INF = -1e4  # large-negative instead of -inf: keeps bf16/fp16 logsumexp finite


class LogitScale(nn.Module):
    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0):
        super().__init__()
        # shape [1], not a scalar: DeepSpeed broadcasts parameters as byte views, which 0-d tensors refuse
        self.log_scale = nn.Parameter(torch.tensor([math.log(1.0 / init_temperature)]))
        self.max_scale = max_scale

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)[0]


@torch.no_grad()
def cosine_kmeans(x: torch.Tensor, mask: torch.Tensor, k: int, iters: int = 5):
    """Batched cosine k-means. x [N, W, d] unit vectors, mask [N, W] -> (cluster id [N, W],
    centroids [N, k, d], cluster sizes [N, k]).

    Centroids start at the first k valid targets (deterministic); a cluster left empty keeps its
    previous centroid. Invalid rows get cluster 0 (they are masked downstream)."""
    N, W, d = x.shape
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # valid targets first
    init = order[:, : min(k, W)]
    cent = torch.gather(x, 1, init[..., None].expand(-1, -1, d))
    if cent.shape[1] < k:
        cent = torch.cat([cent, cent[:, :1].expand(-1, k - cent.shape[1], -1)], 1)
    assign = torch.zeros(N, W, dtype=torch.long, device=x.device)
    for _ in range(iters):
        sim = torch.einsum("nwd,nkd->nwk", x, cent)
        assign = sim.argmax(-1)
        onehot = torch.nn.functional.one_hot(assign, k).to(x.dtype) * mask[..., None].to(x.dtype)
        summed = torch.einsum("nwk,nwd->nkd", onehot, x)
        count = onehot.sum(1)[..., None]
        new = torch.nn.functional.normalize(summed, dim=-1)
        cent = torch.where(count > 0, new, cent)
    return torch.where(mask, assign, torch.zeros_like(assign)), cent, count[..., 0]


@torch.no_grad()
def match_targets_to_queries(user: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """user [N, K, d], targets [N, W, d], mask [N, W] -> query index per target [N, W].

    Clusters the targets into K groups and assigns groups to queries one-to-one maximising the
    size-weighted centroid-query cosine (Hungarian algorithm, ``linear_sum_assignment``). A sample
    with one non-empty cluster needs no assignment: its cluster takes its best query."""
    from scipy.optimize import linear_sum_assignment

    N, K, _ = user.shape
    if K == 1:
        return torch.zeros(mask.shape, dtype=torch.long, device=user.device)
    cluster, cent, count = cosine_kmeans(targets, mask, K)
    # weighted by cluster size: an empty cluster must not claim the query its targets would need
    sim = torch.einsum("nkd,nqd->nkq", cent, user) * count[..., None]  # cluster k vs query q
    best = sim.argmax(-1)  # [N, K]: right wherever at most one cluster is non-empty
    multi_mask = (count > 0).sum(-1) > 1
    if K == 2:
        # two clusters, two queries: keep or swap, whichever scores more (what the Hungarian
        # algorithm returns, without a Python call per sample: every-position training has ~20k)
        keep = sim[:, 0, 0] + sim[:, 1, 1] >= sim[:, 0, 1] + sim[:, 1, 0]
        pair = torch.where(keep[:, None], torch.tensor([0, 1], device=sim.device), torch.tensor([1, 0], device=sim.device))
        best = torch.where(multi_mask[:, None], pair, best)
        return torch.gather(best, 1, cluster)
    multi = torch.nonzero(multi_mask).flatten().cpu().numpy()
    if len(multi):
        sims = sim[torch.as_tensor(multi, device=sim.device)].float().cpu().numpy()
        assigned = best.cpu().numpy()
        for j, n in enumerate(multi):
            rows, cols = linear_sum_assignment(sims[j], maximize=True)
            assigned[n, rows] = cols
        best = torch.as_tensor(assigned, device=user.device)
    return torch.gather(best, 1, cluster)


def _per_positive_loss(user, targets, target_ids, scale):
    """Shared head of both losses: match positives to queries; the positive logits [N, W] and the
    query each positive uses [N, W]."""
    d = user.shape[-1]
    mask = target_ids > 0
    q_idx = match_targets_to_queries(user.detach(), targets.detach(), mask)  # [N, W]
    u = torch.gather(user, 1, q_idx[..., None].expand(-1, -1, d))  # [N, W, d] query per positive
    return mask, q_idx, u, (u * targets).sum(-1) * scale


def full_softmax_infonce(
    user: torch.Tensor,  # [N, K, d] unit
    target_ids: torch.Tensor,  # [N, W] item index, 0 = padding
    item_emb: torch.Tensor,  # [M, d] unit: every catalogue item, row 0 = padding
    scale: torch.Tensor,
    sample_scen: torch.Tensor | None = None,  # [N] scenario of each sample
    pools: list[torch.Tensor] | None = None,  # per scenario, the item indices it may show; None: every item
    eligible: torch.Tensor | None = None,  # [S, M] bool, with ``pools``
    duplicates: torch.Tensor | None = None,  # [M, D] near-duplicate item indices per item, 0 = none
) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-window InfoNCE against the whole eligible catalogue (no sampling, no correction).

    Each sample is scored against its scenario's pool only ([N_s, K, M_s] per scenario, computed
    once per query, not per positive) and each positive reads the log-sum-exp of the query it is
    matched to. The sample's positives and their near-duplicates are scattered out of the
    denominator (a few columns per sample, not a dense [N, K, M] mask) and the positive itself is
    added back. An exact removal: subtracting them in log space cancels catastrophically once a
    positive holds nearly all of a query's mass (large logit scale)."""
    N, W = target_ids.shape
    # targets come from the item side. F.embedding / index_select, not advanced indexing: the
    # latter's backward accumulates repeated indices in parallel, and same seed gave other weights
    targets = F.embedding(target_ids, item_emb)
    mask, q_idx, _, pos = _per_positive_loss(user, targets, target_ids, scale)
    us = user * scale
    M = item_emb.shape[0]
    # the excluded set E of each sample: its positives and their near-duplicates, once each
    excl = target_ids
    if duplicates is not None:
        excl = torch.cat([excl, duplicates[target_ids].reshape(N, -1)], 1)
    if pools is None:
        pools_, scen = [torch.arange(1, M, device=user.device)], torch.zeros(N, dtype=torch.long, device=user.device)
    else:
        pools_, scen = pools, sample_scen
    parts, order = [], []
    for s, pool in enumerate(pools_):
        rows = torch.nonzero(scen == s).flatten()
        if not len(rows):
            continue
        # E's columns inside this pool get -inf (an out-of-pool or padding entry re-hits a kept one)
        where = torch.full((M,), -1, dtype=torch.long, device=user.device)
        where[pool] = torch.arange(len(pool), device=user.device)
        col = where[excl[rows]]
        first = torch.where(col >= 0, col, col.max(1, keepdim=True).values.clamp_min(0))
        col = torch.where(col >= 0, col, first)
        logits = torch.einsum("nkd,md->nkm", us.index_select(0, rows), item_emb.index_select(0, pool))  # [N_s, K, M_s]
        logits = logits.scatter(2, col[:, None, :].expand(-1, logits.shape[1], -1), NEG_INF)
        parts.append(torch.logsumexp(logits, -1))
        order.append(rows)
    rest = torch.cat(parts).index_select(0, torch.argsort(torch.cat(order)))  # log-sum-exp over the pool without E
    per_pos = torch.logaddexp(torch.gather(rest, 1, q_idx), pos) - pos
    loss = (per_pos * mask).sum() / mask.sum().clamp_min(1)
    stats = {"positives": float(mask.sum()), "scale": float(scale.detach())}
    return loss, stats


def next_window_infonce(
    user: torch.Tensor,  # [N, K, d] unit
    targets: torch.Tensor,  # [N, W, d] unit (projected held-out items)
    target_ids: torch.Tensor,  # [N, W] item index, 0 = padding
    negatives: torch.Tensor,  # [M, d] unit, shared by the batch
    negative_ids: torch.Tensor,  # [M]
    scale: torch.Tensor,
    eligible: torch.Tensor | None = None,  # [S, n_items + 1] bool: item eligible in scenario
    sample_scen: torch.Tensor | None = None,  # [N] scenario of each sample
    in_batch: int = 512,
    false_negative_cos: float = 0.98,
    dup_ref: torch.Tensor | None = None,  # [n_items + 1, D] fixed unit vectors for the near-duplicate test
    item_prob: torch.Tensor | None = None,  # [n_items + 1] training frequency of each item, for logQ
    n_catalogue: int | None = None,  # items the uniform negatives are drawn from
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sampled softmax for catalogues too large for the full one, with logQ correction (Yi et al.,
    RecSys 2019): every logit, the positive's included, is lowered by the log of how often its
    item is expected among the negatives: ``M / n`` for the uniform draws plus ``P * p(item)`` for
    the in-batch positives (P of them, drawn by popularity). Without it in-batch negatives push
    popular items down for nothing but being popular. ``item_prob`` None disables in-batch
    negatives (they are never used uncorrected)."""
    N, W, d = targets.shape
    mask, q_idx, u, pos = _per_positive_loss(user, targets, target_ids, scale)

    neg_vecs, neg_ids = negatives, negative_ids
    n_in_batch = 0
    if in_batch > 0 and item_prob is not None:
        # the other samples' positives, once per distinct item, at most ``in_batch`` of them: the
        # logits tensor is [N, W, M'] and dominates the step's cost
        flat = target_ids.reshape(-1)
        keep = flat > 0
        ids_k, vec_k = flat[keep], targets.reshape(-1, d)[keep]
        uniq, inv = torch.unique(ids_k, return_inverse=True)
        first = torch.full((len(uniq),), len(ids_k), dtype=torch.long, device=ids_k.device)
        first = first.scatter_reduce(0, inv, torch.arange(len(ids_k), device=ids_k.device), reduce="amin")
        if len(first) > in_batch:
            first = first[torch.randperm(len(first), device=first.device)[:in_batch]]
        n_in_batch = int(keep.sum())
        neg_vecs = torch.cat([negatives, vec_k[first]], 0)
        neg_ids = torch.cat([negative_ids, ids_k[first]], 0)
    if eligible is not None and sample_scen is not None:
        ok = eligible[sample_scen][:, neg_ids]  # [N, M']
    else:
        ok = torch.ones(N, neg_ids.shape[0], dtype=torch.bool, device=user.device)
    neg = torch.einsum("nwd,md->nwm", u, neg_vecs) * scale  # [N, W, M']
    if item_prob is not None:
        n_cat = n_catalogue or (item_prob.shape[0] - 1)

        def log_q(ids):
            expected = negatives.shape[0] / n_cat + (n_in_batch * item_prob[ids] if n_in_batch else 0.0)
            return torch.log(torch.as_tensor(expected, dtype=neg.dtype, device=neg.device).clamp_min(1e-12))

        neg = neg - log_q(neg_ids)[None, None, :]
        pos = pos - log_q(target_ids)
    same_item = (target_ids[:, :, None] == neg_ids[None, None, :]).any(1, keepdim=True)  # neg is any positive of the sample
    drop = same_item | ~ok[:, None, :]
    if dup_ref is not None:
        drop = drop | (torch.einsum("nwd,md->nwm", dup_ref[target_ids], dup_ref[neg_ids]) > false_negative_cos)
    logits = torch.cat([pos[..., None], neg.masked_fill(drop, NEG_INF)], -1)
    per_pos = torch.logsumexp(logits, -1) - logits[..., 0]
    loss = (per_pos * mask).sum() / mask.sum().clamp_min(1)
    stats = {
        "masked_negatives": float(drop.float().mean()),
        "positives": float(mask.sum()),
        "scale": float(scale.detach()),
    }
    return loss, stats


@torch.no_grad()
def near_duplicate_table(ref: torch.Tensor, threshold: float, chunk: int = 4096) -> torch.Tensor | None:
    """[M, D] for each item, the other items whose fixed content vectors (unit rows of ``ref``)
    have cosine > ``threshold``, 0-padded; None when no pair qualifies."""
    found: dict[int, list[int]] = {}
    for i in range(0, ref.shape[0], chunk):
        sim = ref[i : i + chunk] @ ref.T
        r, c = torch.nonzero(sim > threshold, as_tuple=True)
        for a, b in zip((r + i).tolist(), c.tolist()):
            if a != b and a > 0 and b > 0:
                found.setdefault(a, []).append(b)
    if not found:
        return None
    table = torch.zeros(ref.shape[0], max(len(v) for v in found.values()), dtype=torch.long)
    for a, v in found.items():
        table[a, : len(v)] = torch.as_tensor(v)
    return table.to(ref.device)
