"""What the model would have served during the training window: the reference for the
user-embedding drift and the served-score (prediction) drift.

A user has K vectors per scenario; drift is measured on their L2-normalised mean, one
``dim``-sized vector per request. Serving-log embeddings are reduced the same way
(``reduce_embedding``), whether the log holds the K x dim vectors or the mean already.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def reduce_embedding(vec, dim: int) -> np.ndarray | None:
    """``dim`` values, or K x ``dim`` values (K query vectors), to one unit vector; None if unusable."""
    a = np.asarray(vec, dtype=np.float64).ravel()
    if a.size == 0 or a.size % dim or not np.isfinite(a).all():
        return None
    m = a.reshape(-1, dim).mean(0)
    n = np.linalg.norm(m)
    return m / n if n > 0 else None


REQUESTS_AT = ("window-end", "events")


def reference_model_outputs(
    events: pd.DataFrame, items: pd.DataFrame, model_dir: str | Path, scenarios: list[str],
    top_k: int = 10, max_requests: int = 2000, seed: int = 0, at: str = "window-end",
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(embeddings: scenario + history_len + e0..e{d-1}, scores: scenario + history_len + rank +
    score, model info with the replay hit counts).

    Users are sampled by activity (a sample of each scenario's events). ``at`` says where their
    requests are replayed, i.e. which traffic the reference stands for:
    - ``window-end``: each sampled user as they stand when the model is deployed (history = all
      their events): returning users, most of an app's traffic right after a deploy. Measured on
      ML-1M, 4,000 requests of existing users to the just-deployed model: user-embedding AUC
      0.52-0.55, where a reference ``at`` events gave 0.68-0.75 (a false page in every scenario).
    - ``events``: at the sampled events themselves (history = the events before), mid-history
      states: traffic of users who arrive and build their history during the window.
    The hit-rate reference is always replayed at the events (it needs the event that followed).
    """
    if at not in REQUESTS_AT:
        raise ValueError(f"requests_at '{at}': use one of {', '.join(REQUESTS_AT)}")
    rng = np.random.default_rng(seed)
    picks = []
    for s in scenarios:
        idx = np.flatnonzero(events["scenario"].to_numpy() == s)
        if len(idx) > max_requests:
            idx = np.sort(rng.choice(idx, size=max_requests, replace=False))
        picks.append(idx)
    sampled = events.iloc[np.concatenate(picks)].reset_index(drop=True)
    req = sampled[["user_id", "scenario", "ts"]].copy()
    req.insert(0, "request_id", [f"ref-{i}" for i in range(len(req))])
    served, info = serve_like(model_dir, events, items, req, top_k)
    # as the live checks: model-ranked responses only (a live cold start serves popularity)
    model = ~served["cold_start"].astype(bool).to_numpy()
    hits = replay_hits(served[model], sampled[model], top_k)
    if at == "window-end":
        # one request per sampled (user, scenario): a repeated state would be the same vector twice
        end = req.drop_duplicates(["user_id", "scenario"]).assign(ts=float(events["ts"].max()) + 1)
        served, _ = serve_like(model_dir, events, items, end.reset_index(drop=True), top_k)
        model = ~served["cold_start"].astype(bool).to_numpy()
    served = served[model].reset_index(drop=True)
    dim = int(info["model"]["dim"])
    vecs = [reduce_embedding(v, dim) for v in served["user_embedding"]]
    keep = [i for i, v in enumerate(vecs) if v is not None]
    emb = pd.DataFrame(np.asarray([vecs[i] for i in keep]).reshape(-1, dim), columns=[f"e{d}" for d in range(dim)])
    emb.insert(0, "scenario", served["scenario"].to_numpy()[keep])
    emb.insert(1, "history_len", served["history_len"].to_numpy()[keep])
    scores = served[["scenario", "history_len", "scores"]].explode("scores").rename(columns={"scores": "score"})
    scores["rank"] = scores.groupby(level=0).cumcount()
    scores = scores.dropna().astype({"score": "float64"}).reset_index(drop=True)[["scenario", "history_len", "rank", "score"]]
    meta = {"dim": dim, "variant": info["model"].get("variant"), "n_requests": int(len(served)), "requests_at": at,
            "replay_hits": hits}
    return emb, scores, meta


def replay_hits(served: pd.DataFrame, events: pd.DataFrame, top_k: int) -> dict:
    """Per scenario, what the online hit rate measures, on the reference's own replayed requests:
    the event each request was replayed at is the one that reacted to it. ``hits`` counts, per
    action, the requests whose event's item was served (``requests``: all of them), so the check
    applies its own negative actions."""
    out: dict = {}
    for s, item, action, items in zip(served["scenario"], events["item_id"].astype(str), events["action"].astype(str), served["items"]):
        d = out.setdefault(s, {"k": top_k, "requests": 0, "hits": {}})
        d["requests"] += 1
        if item in items[:top_k]:
            d["hits"][action] = d["hits"].get(action, 0) + 1
    return out


def serve_like(model_dir: str | Path, events: pd.DataFrame, items: pd.DataFrame, requests: pd.DataFrame, top_k: int = 10) -> tuple[pd.DataFrame, dict]:
    """Recommendations computed the way the serving path does, one per request row (request_id,
    user_id, scenario, ts): the user's events strictly before ts are the history, seen items and
    items not eligible in the scenario are masked. Returns serving-log records (contract 1) and
    the checkpoint info. The reference uses it; tests and the benchmark use it to write a
    serving log from a real model without the HTTP service."""
    from redrec.release.model_store import verify_dir

    verify_dir(model_dir)  # a model store version (or its cached copy) is checked against its manifest
    # the model stack is imported here: the drift check itself (reduce_embedding) never loads
    # torch (180 MB of peak RSS at import, measured on the 2-core EPYC)
    import torch

    with torch.no_grad():
        return _serve_like(model_dir, events, items, requests, top_k)


def _serve_like(model_dir, events, items, requests, top_k):
    from redrec.data.dataset import RecData, encode
    from redrec.model.checkpoint import load_for_serving
    from redrec.train.batches import BatchBuilder

    model, info = load_for_serving(model_dir)
    cfg = model.cfg
    item_ids = info["item_ids"]
    cat = items.drop_duplicates("item_id").set_index("item_id")
    missing = [i for i in item_ids if i not in cat.index]
    if missing:
        raise ValueError(f"{model_dir}: the model knows {len(missing)} item(s) missing from the items given, e.g. {missing[:3]}")
    ev = events[events["item_id"].isin(set(item_ids)) & events["scenario"].isin(cfg.scenarios) & events["action"].isin(cfg.actions)]
    enc = encode(RecData("serve-like", ev.copy(), cat.loc[item_ids].reset_index(), list(cfg.scenarios), list(cfg.actions)))
    builder = BatchBuilder(enc, cfg.user_tower.max_len, cfg.window, cfg.history_mode)
    per_scen = builder.mode == "per-scenario"
    uidx = {u: i for i, u in enumerate(enc.user_ids)}
    item_emb = model.all_item_embeddings()
    version = str(info.get("variant") or info["model"].get("variant"))
    out = []
    reqs = requests.reset_index(drop=True)
    for i in range(0, len(reqs), 256):
        rows, ctx = [], []
        for r in reqs.iloc[i : i + 256].itertuples(index=False):
            j = cfg.scenarios.index(r.scenario)
            u = uidx.get(str(r.user_id))
            if u is None:  # cold start: no history at all
                start = end = 0
                rows.append(builder.history_row(0, int(enc.offsets[0]), j if per_scen else None))
            else:
                start = int(enc.offsets[u])
                end = start + int(np.searchsorted(enc.ts[enc.user_slice(u)], int(r.ts), side="left"))
                rows.append(builder.history_row(u, end, j if per_scen else None))
            ctx.append((r, j, start, end))
        vecs = model.user_vectors(builder.eval_batch(rows))  # [B, C, K, d]
        row_items = [r["items"] for r in rows]  # 0 pads a cold row
        for b, (r, j, start, end) in enumerate(ctx):
            v = vecs[b, 0] if per_scen else vecs[b, j]
            scores = (v @ item_emb.T).max(0).values.numpy().astype(np.float64)
            scores[~enc.eligible[j]] = -np.inf  # column 0 (padding) is never eligible
            scores[enc.item[start:end]] = -np.inf
            top = np.argsort(-scores, kind="stable")[:top_k]
            top = top[np.isfinite(scores[top])]
            out.append({
                "request_id": str(r.request_id), "ts": float(r.ts), "user_id": str(r.user_id), "scenario": r.scenario,
                "arm": "control", "model_version": version, "items": [item_ids[t - 1] for t in top],
                "scores": [float(scores[t]) for t in top], "cold_start": end == start, "user_embedding": v.numpy().ravel().tolist(),
                "history_len": int((row_items[b] > 0).sum()),
            })
    return pd.DataFrame(out), info
