"""Next-window InfoNCE with scenario queries (DESIGN.md, "Loss").

For each (user, cut, scenario) sample the positives are the user's next W items in that scenario;
each positive is matched to one of the K query vectors (cosine k-means on the targets, then an
optimal cluster->query assignment); negatives are catalogue items sampled once and shared by the
whole batch, plus the other samples' positives (in-batch); a negative equal to one of the
sample's positives, ineligible in the sample's scenario, or with cosine > ``false_negative_cos``
to the positive is masked. That cosine is taken on fixed reference vectors (the item LLM's cached
text embeddings), never on the embeddings being learned: masked negatives lower the loss, so a
mask computed on learned vectors rewards collapsing every item onto one point (an id-only model
has no such vectors and masks same-id negatives only). The logit scale is learnable, starts at
1/0.07 and is capped at 100.
"""

from __future__ import annotations

import itertools
import math

import torch
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
    size-weighted centroid-query cosine (exhaustive over the K! permutations, exact for the small K used)."""
    N, K, _ = user.shape
    if K == 1:
        return torch.zeros(mask.shape, dtype=torch.long, device=user.device)
    cluster, cent, count = cosine_kmeans(targets, mask, K)
    # weighted by cluster size: an empty cluster must not claim the query its targets would need
    sim = torch.einsum("nkd,nqd->nkq", cent, user) * count[..., None]  # cluster k vs query q
    perms = torch.tensor(list(itertools.permutations(range(K))), device=user.device)  # [P, K]
    score = sim[:, torch.arange(K, device=user.device)[None, :], perms].sum(-1)  # [N, P]
    best = perms[score.argmax(-1)]  # [N, K]: cluster k -> query best[n, k]
    return torch.gather(best, 1, cluster)


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
) -> tuple[torch.Tensor, dict[str, float]]:
    N, W, d = targets.shape
    mask = target_ids > 0
    q_idx = match_targets_to_queries(user.detach(), targets.detach(), mask)  # [N, W]
    u = torch.gather(user, 1, q_idx[..., None].expand(-1, -1, d))  # [N, W, d] query per positive
    pos = (u * targets).sum(-1)  # [N, W]

    neg_vecs, neg_ids = negatives, negative_ids
    if in_batch > 0:
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
        neg_vecs = torch.cat([negatives, vec_k[first]], 0)
        neg_ids = torch.cat([negative_ids, ids_k[first]], 0)
    if eligible is not None and sample_scen is not None:
        ok = eligible[sample_scen][:, neg_ids]  # [N, M']
    else:
        ok = torch.ones(N, neg_ids.shape[0], dtype=torch.bool, device=user.device)
    neg = torch.einsum("nwd,md->nwm", u, neg_vecs)  # [N, W, M']
    same_item = (target_ids[:, :, None] == neg_ids[None, None, :]).any(1, keepdim=True)  # neg is any positive of the sample
    drop = same_item | ~ok[:, None, :]
    if dup_ref is not None:
        drop = drop | (torch.einsum("nwd,md->nwm", dup_ref[target_ids], dup_ref[neg_ids]) > false_negative_cos)
    logits = torch.cat([pos[..., None], neg.masked_fill(drop, NEG_INF)], -1) * scale
    per_pos = torch.logsumexp(logits, -1) - logits[..., 0]
    loss = (per_pos * mask).sum() / mask.sum().clamp_min(1)
    stats = {
        "masked_negatives": float(drop.float().mean()),
        "positives": float(mask.sum()),
        "scale": float(scale.detach()),
    }
    return loss, stats
