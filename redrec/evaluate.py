"""Full-ranking offline evaluation: HR@K, NDCG@K, MRR per scenario and overall.

For each user and scenario with held-out events in that scenario: every item eligible in the
scenario is scored, the user's whole history (everything before the held-out window) is masked,
and the held-out items not already in the history are the targets. NDCG's ideal DCG is taken
over min(K, #targets). Ties count against the target. No sampled negatives anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from redrec.data.dataset import EncodedData
from redrec.data.split import Split

KS = (10, 50)


def metrics_from_ranks(ranks: np.ndarray, n_targets: int, ks=KS) -> dict[str, float]:
    out = {"mrr": float(1.0 / ranks.min())}
    for k in ks:
        hit = ranks <= k
        dcg = float((1.0 / np.log2(ranks[hit] + 1)).sum())
        idcg = float((1.0 / np.log2(np.arange(2, min(k, n_targets) + 2))).sum())
        out[f"hr@{k}"] = float(hit.any())
        out[f"ndcg@{k}"] = dcg / idcg
    return out


def rank_metrics(scores: np.ndarray, targets: list[int], ks=KS) -> dict[str, float]:
    """Metrics of one ranking. ``scores`` has -inf on masked items; ``targets`` are item indices.

    Ties count against the target: its rank is the number of candidates scoring >= it (itself
    included), a NaN anywhere else counts as outranking it, and a NaN target ranks last. A
    constant or NaN scorer therefore gets about nothing, never a perfect score."""
    s = np.asarray(scores, dtype=np.float64)
    nan = np.isnan(s)
    n_cand = int((~np.isneginf(s)).sum())
    ranks = np.array([n_cand if nan[t] else int((s >= s[t]).sum() + nan.sum()) for t in targets])
    return metrics_from_ranks(ranks, len(targets), ks)


def _batch_ranks(scores: torch.Tensor, targets: list[list[int]]) -> list[np.ndarray]:
    """rank_metrics' ranks for a batch of rankings at once: scores [B, M] with -inf on masked items."""
    T = max(len(t) for t in targets)
    idx = torch.zeros(len(targets), T, dtype=torch.long)
    for b, t in enumerate(targets):
        idx[b, : len(t)] = torch.as_tensor(t)
    idx = idx.to(scores.device)
    ts = scores.gather(1, idx)  # [B, T]
    nan = torch.isnan(scores)
    ge = (scores[:, None, :] >= ts[:, :, None]).sum(-1) + nan.sum(-1, keepdim=True)
    n_cand = (~torch.isneginf(scores)).sum(-1, keepdim=True).expand_as(ge)
    ranks = torch.where(torch.isnan(ts), n_cand, ge).cpu().numpy()
    return [ranks[b, : len(t)] for b, t in enumerate(targets)]


@dataclass
class EvalTask:
    """What to rank for one (user, scenario): history end, targets, the items to mask."""

    user: int
    scenario: int
    history_end: int
    targets: list[int]
    seen: np.ndarray


def eval_users(enc: EncodedData, max_users: int | None = None) -> np.ndarray:
    """All users, or a fixed sample of ``max_users`` of them (validation on large logs)."""
    users = np.arange(enc.n_users)
    if max_users is not None and enc.n_users > max_users:
        users = np.sort(np.random.default_rng(0).choice(users, size=max_users, replace=False))
    return users


def eval_tasks(enc: EncodedData, split: Split, on: str = "test", max_users: int | None = None) -> list[EvalTask]:
    tasks = []
    test_ends = split.test_ends(enc)
    for u in eval_users(enc, max_users):
        start = int(enc.offsets[u])
        h, stop = (int(split.valid_end[u]), int(test_ends[u])) if on == "test" else (int(split.train_end[u]), int(split.valid_end[u]))
        if stop <= h:
            continue
        seen = np.unique(enc.item[start:h])
        for s in np.unique(enc.scenario[h:stop]):
            tg = np.unique(enc.item[h:stop][enc.scenario[h:stop] == s])
            tg = tg[~np.isin(tg, seen)]
            if len(tg):
                tasks.append(EvalTask(u, int(s), h, tg.tolist(), seen))
    return tasks


@dataclass
class EvalResult:
    per_scenario: dict[str, dict[str, float]]
    overall: dict[str, float]
    counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"per_scenario": self.per_scenario, "overall": self.overall, "counts": self.counts}


def aggregate(rows: list[tuple[int, dict[str, float]]], scenarios: list[str]) -> EvalResult:
    per, counts = {}, {}
    for s, name in enumerate(scenarios):
        mine = [m for sc, m in rows if sc == s]
        counts[name] = len(mine)
        if mine:
            per[name] = {k: float(np.mean([m[k] for m in mine])) for k in mine[0]}
    overall = {k: float(np.mean([m[k] for _, m in rows])) for k in rows[0][1]} if rows else {}
    counts["overall"] = len(rows)
    return EvalResult(per, overall, counts)


def _mask(scores: torch.Tensor, tasks: list[EvalTask], eligible: np.ndarray | None) -> torch.Tensor:
    """-inf on padding, the user's history and (multi-scenario protocol) items the task's
    scenario cannot show; ``eligible`` None ranks the whole catalogue."""
    scores = scores.clone()
    if eligible is not None:
        elig = torch.from_numpy(eligible).to(scores.device)
        scores[~elig[[t.scenario for t in tasks]]] = -torch.inf
    scores[:, 0] = -torch.inf
    rows = torch.cat([torch.full((len(t.seen),), b, dtype=torch.long) for b, t in enumerate(tasks)])
    cols = torch.cat([torch.as_tensor(t.seen, dtype=torch.long) for t in tasks])
    scores[rows.to(scores.device), cols.to(scores.device)] = -torch.inf
    return scores


def _rows(scores: torch.Tensor, tasks: list[EvalTask], eligible: np.ndarray | None) -> list[tuple[int, dict[str, float]]]:
    ranks = _batch_ranks(_mask(scores, tasks, eligible), [t.targets for t in tasks])
    return [(t.scenario, metrics_from_ranks(r, len(t.targets))) for t, r in zip(tasks, ranks)]


@torch.no_grad()
def evaluate_model(model, builder, enc: EncodedData, split: Split, on: str = "test", batch_size: int = 256, all_items: bool = False,
                   max_users: int | None = None) -> EvalResult:
    was_training = model.training
    model.eval()
    item_emb = model.all_item_embeddings()  # [N+1, d]
    tasks = eval_tasks(enc, split, on, max_users)
    per_scen = builder.mode == "per-scenario"
    dev = item_emb.device
    # mixed history: one forward per user reads every scenario's queries (the tasks of a user share
    # the history); per-scenario history: one forward per task
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tasks):
        groups.setdefault((t.user, t.history_end, t.scenario if per_scen else None), []).append(i)
    keys = list(groups)
    vecs: list[torch.Tensor | None] = [None] * len(tasks)
    for i in range(0, len(keys), batch_size):
        chunk = keys[i : i + batch_size]
        batch = builder.eval_batch([builder.history_row(u, h, s) for u, h, s in chunk])
        user = model.user_vectors({k: v.to(dev) for k, v in batch.items()})  # [B, C, K, d]
        for b, key in enumerate(chunk):
            for j in groups[key]:
                vecs[j] = user[b, 0] if per_scen else user[b, tasks[j].scenario]  # [K, d]
    rows = []
    for i in range(0, len(tasks), batch_size):
        chunk = tasks[i : i + batch_size]
        u = torch.stack(vecs[i : i + batch_size])  # [B, K, d]
        scores = torch.einsum("bkd,md->bkm", u, item_emb).max(1).values.double()  # max cosine over the K queries
        rows += _rows(scores, chunk, None if all_items else enc.eligible)
    model.train(was_training)
    return aggregate(rows, enc.scenarios)


def evaluate_popularity(enc: EncodedData, split: Split, on: str = "test", all_items: bool = False) -> EvalResult:
    """Per-scenario popularity over the training portion (plus validation when testing)."""
    n = enc.n_items + 1
    ends = split.valid_end if on == "test" else split.train_end
    keep = np.zeros(len(enc.item), dtype=bool)
    for u in range(enc.n_users):
        keep[enc.offsets[u] : ends[u]] = True
    pop = np.zeros((len(enc.scenarios), n))
    np.add.at(pop, (enc.scenario[keep], enc.item[keep]), 1.0)
    if all_items:
        pop[:] = pop.sum(0, keepdims=True)
    tie = 1e-9 * np.arange(n)[::-1]  # deterministic tie-break: equal counts would all rank last
    tasks = eval_tasks(enc, split, on)
    rows = []
    for i in range(0, len(tasks), 256):
        chunk = tasks[i : i + 256]
        scores = torch.from_numpy(pop[[t.scenario for t in chunk]] + tie[None, :])
        rows += _rows(scores, chunk, None if all_items else enc.eligible)
    return aggregate(rows, enc.scenarios)


def evaluate_new_item_popularity(enc: EncodedData, split: Split, cutoff: int, hours: float = 24.0, on: str = "test") -> EvalResult:
    """What a cold-start fallback ranks by: new items (first seen at or after the cut-off T; an
    arrival date is catalogue metadata a server has) first, by their events in their first
    ``hours`` (from max(T, their first event)), then warm items by their events in the ``hours``
    after T, the whole catalogue ranked. The test events themselves are not counted (new items
    have few events, so a user's own target would lift it); other users' events in those windows
    are, as a deployed fallback would have seen them. Ties fall back to training popularity."""
    n = enc.n_items + 1
    first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, enc.item, enc.ts)
    is_new = (first >= cutoff) & (first < np.iinfo(np.int64).max)
    since = np.maximum(first, cutoff)[enc.item]
    window = (enc.ts >= since) & (enc.ts < since + int(hours * 3600))
    for u in split.users_with_test(enc):
        window[split.valid_end[u] : split.test_ends(enc)[u]] = False
    early = np.bincount(enc.item[window], minlength=n).astype(np.float64)
    keep = np.zeros(len(enc.item), dtype=bool)
    for u in range(enc.n_users):
        keep[enc.offsets[u] : split.train_end[u]] = True
    train = np.bincount(enc.item[keep], minlength=n).astype(np.float64)
    # new before warm whatever the counts; training counts only break ties (they sum to < 1 event)
    score = is_new * (early.max() + 2.0) + early + 0.5 * train / max(train.max(), 1.0) + 1e-9 * np.arange(n)[::-1]
    tasks = eval_tasks(enc, split, on)
    rows = []
    for i in range(0, len(tasks), 256):
        chunk = tasks[i : i + 256]
        rows += _rows(torch.from_numpy(np.broadcast_to(score, (len(chunk), n)).copy()), chunk, None)
    return aggregate(rows, enc.scenarios)


def evaluate_content_knn(enc: EncodedData, split: Split, item_vecs: np.ndarray, on: str = "test", all_items: bool = False,
                         last_n: int = 50) -> EvalResult:
    """Content kNN, the no-training text baseline: a user's score for item i is the cosine between
    the mean of the unit text vectors of their last ``last_n`` history events and item i's unit
    vector. ``item_vecs`` is [n_items + 1, D] in encoded index order (row 0 padding), e.g. the
    cached item-tower representations with a zero row prepended. Repeated items count per event,
    and the history mixes every scenario (as RED-Rec's does)."""
    if item_vecs.shape[0] != enc.n_items + 1:
        raise ValueError(f"item_vecs has {item_vecs.shape[0]} rows; want n_items + 1 = {enc.n_items + 1} (row 0 padding)")
    vecs = torch.from_numpy(np.asarray(item_vecs, dtype=np.float64))
    unit = torch.nn.functional.normalize(vecs, dim=-1)
    tasks = eval_tasks(enc, split, on)
    rows = []
    for i in range(0, len(tasks), 256):
        chunk = tasks[i : i + 256]
        users = torch.zeros(len(chunk), unit.shape[1], dtype=torch.float64)
        for b, t in enumerate(chunk):
            start = int(enc.offsets[t.user])
            hist = enc.item[max(start, t.history_end - last_n) : t.history_end]
            if len(hist):
                users[b] = unit[torch.from_numpy(hist)].mean(0)
        scores = torch.nn.functional.normalize(users, dim=-1) @ unit.T
        rows += _rows(scores, chunk, None if all_items else enc.eligible)
    return aggregate(rows, enc.scenarios)


def format_table(results: dict[str, EvalResult], scenarios: list[str], metric_keys=("ndcg@10", "hr@10", "mrr"), ref: str | None = None) -> str:
    """One row per model and scenario (then overall), so the table stays under 100 columns
    however many scenarios there are; ``ref``: the first metric's ratio to that model's."""
    cols = scenarios + ["overall"]
    name_w = max([18, *(len(n) + 1 for n in results)])
    head = f"{'model':<{name_w}}{'scenario':<12}" + "".join(f"{m:>10}" for m in metric_keys)
    if ref and ref in results:
        head += f"{metric_keys[0] + ' vs ' + ref:>24}"
    lines = [head, "-" * len(head)]
    for name, res in results.items():
        for c in cols:
            src = res.overall if c == "overall" else res.per_scenario.get(c, {})
            row = f"{name:<{name_w}}{c:<12}" + "".join(f"{src.get(m, float('nan')):>10.4f}" for m in metric_keys)
            if ref and ref in results:
                rs = results[ref].overall if c == "overall" else results[ref].per_scenario.get(c, {})
                v, r = src.get(metric_keys[0], float("nan")), rs.get(metric_keys[0])
                row += f"{(f'{v / r:.2f}x') if r else '-':>24}"
            lines.append(row)
    return "\n".join(lines)
