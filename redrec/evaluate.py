"""Full-ranking offline evaluation: HR@K, NDCG@K, MRR per scenario and overall.

For each user and scenario with held-out events in that scenario: every item eligible in the
scenario is scored, the user's whole history (everything before the held-out window) is masked,
and the held-out items not already in the history are the targets. NDCG's ideal DCG is taken
over min(K, #targets). No sampled negatives anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from redrec.data.dataset import EncodedData
from redrec.data.split import Split

KS = (10, 50)


def rank_metrics(scores: np.ndarray, targets: list[int], ks=KS) -> dict[str, float]:
    """Metrics of one ranking. ``scores`` has -inf on masked items; ``targets`` are item indices."""
    ranks = np.array([int((scores > scores[t]).sum()) + 1 for t in targets])
    out = {"mrr": float(1.0 / ranks.min())}
    for k in ks:
        hit = ranks <= k
        dcg = float((1.0 / np.log2(ranks[hit] + 1)).sum())
        idcg = float((1.0 / np.log2(np.arange(2, min(k, len(targets)) + 2))).sum())
        out[f"hr@{k}"] = float(hit.any())
        out[f"ndcg@{k}"] = dcg / idcg
    return out


@dataclass
class EvalTask:
    """What to rank for one (user, scenario): history end, targets, the items to mask."""

    user: int
    scenario: int
    history_end: int
    targets: list[int]
    seen: np.ndarray


def eval_tasks(enc: EncodedData, split: Split, on: str = "test") -> list[EvalTask]:
    tasks = []
    for u in range(enc.n_users):
        start, end = int(enc.offsets[u]), int(enc.offsets[u + 1])
        h, stop = (int(split.valid_end[u]), end) if on == "test" else (int(split.train_end[u]), int(split.valid_end[u]))
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


def _score_rows(scores: np.ndarray, task: EvalTask, eligible: np.ndarray | None) -> dict[str, float]:
    scores = scores.astype(np.float64, copy=True)
    if eligible is not None:  # None: the single-scenario protocol ranks the whole catalogue
        scores[~eligible[task.scenario]] = -np.inf
    scores[0] = -np.inf
    scores[task.seen] = -np.inf
    return rank_metrics(scores, task.targets)


@torch.no_grad()
def evaluate_model(model, builder, enc: EncodedData, split: Split, on: str = "test", batch_size: int = 256, all_items: bool = False) -> EvalResult:
    model.eval()
    item_emb = model.all_item_embeddings()  # [N+1, d]
    tasks = eval_tasks(enc, split, on)
    rows = []
    per_scen = builder.mode == "per-scenario"
    for i in range(0, len(tasks), batch_size):
        chunk = tasks[i : i + batch_size]
        batch = builder.eval_batch([builder.history_row(t.user, t.history_end, t.scenario if per_scen else None) for t in chunk])
        dev = item_emb.device
        user = model.user_vectors({k: v.to(dev) for k, v in batch.items()})  # [B, C, K, d]
        for b, t in enumerate(chunk):
            u = user[b, 0] if per_scen else user[b, t.scenario]  # [K, d]
            scores = (u @ item_emb.T).max(0).values.cpu().numpy()  # max cosine over the K queries
            rows.append((t.scenario, _score_rows(scores, t, None if all_items else enc.eligible)))
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
    tie = 1e-9 * np.arange(n)[::-1]  # deterministic tie-break
    rows = [(t.scenario, _score_rows(pop[t.scenario] + tie, t, None if all_items else enc.eligible)) for t in eval_tasks(enc, split, on)]
    return aggregate(rows, enc.scenarios)


def format_table(results: dict[str, EvalResult], scenarios: list[str], metric_keys=("ndcg@10", "hr@10", "mrr"), ref: str | None = None) -> str:
    cols = scenarios + ["overall"]
    lines = [f"{'model':<18}" + "".join(f"{c + ' ' + m:>22}" for c in cols for m in metric_keys)]
    for name, res in results.items():
        cells = []
        for c in cols:
            src = res.overall if c == "overall" else res.per_scenario.get(c, {})
            for m in metric_keys:
                v = src.get(m, float("nan"))
                r = ""
                if ref and ref in results and m == metric_keys[0]:
                    rs = results[ref].overall if c == "overall" else results[ref].per_scenario.get(c, {})
                    if rs.get(m):
                        r = f" ({v / rs[m]:.2f}x)"
                cells.append(f"{v:.4f}{r}".rjust(22))
        lines.append(f"{name:<18}" + "".join(cells))
    return "\n".join(lines)
