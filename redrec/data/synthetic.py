"""A seedable multi-scenario world: users with latent interests shared across scenarios.

- Items belong to one topic (plus a secondary one); their text comes from the topics' vocabularies
  so a text tower can tell topics apart. Every item is eligible in homefeed and search; a
  "sponsored" share is also eligible in ads, and some items are ads-only.
- Each user has a long-term interest mix over a few topics and a short-term *intent* topic that
  persists for a while. Search follows the intent sharply (the user types it), homefeed mixes
  long-term interest with popularity, ads show sponsored items near the intent with more noise.
  Because intent set in one scenario carries into the next events in other scenarios, reading
  behaviour from all scenarios (dense mixing) predicts better than one scenario's history alone.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from redrec.data.dataset import RecData

SCENARIOS = ["homefeed", "search", "ads"]
ACTIONS = ["click", "like", "share", "skip"]

_SYLLABLES = "ka lo mi ra tu ne so vi da pe zu ba ri fo gu he ja ko lu ma".split()


class SyntheticConfig(BaseModel):
    n_users: int = Field(300, ge=1)
    n_items: int = Field(500, ge=10)
    n_topics: int = Field(12, ge=2)
    events_per_user: float = Field(40.0, gt=1)
    sponsored_share: float = Field(0.3, gt=0, lt=1)
    ads_only_share: float = Field(0.1, ge=0, lt=1)
    scenario_mix: tuple[float, float, float] = (0.55, 0.25, 0.20)
    intent_persistence: float = Field(0.9, ge=0, le=1)
    seed: int = 0
    start_ts: int = 1_700_000_000
    # Item arrivals, for the new-items protocol: this share of the catalogue is released at a
    # uniform time in the last ``1 - new_item_release`` of the 30-day window and is never drawn
    # before. Without it every item is live from day one and the catalogue's "new" items are only
    # its rarest ones (0 of 800 on the bench's synthetic set). 0 keeps the data as it always was.
    new_item_share: float = Field(0.0, ge=0, lt=1)
    new_item_release: float = Field(0.8, ge=0, lt=1)


def _vocab(rng: np.random.Generator, n_topics: int, words: int = 30) -> list[list[str]]:
    vocab = []
    for t in range(n_topics):
        ws = set()
        while len(ws) < words:
            ws.add("".join(rng.choice(_SYLLABLES, size=rng.integers(2, 4))) + f"{t}")
        vocab.append(sorted(ws))
    return vocab


def generate(cfg: SyntheticConfig | None = None) -> RecData:
    cfg = cfg or SyntheticConfig()
    rng = np.random.default_rng(cfg.seed)
    T, N = cfg.n_topics, cfg.n_items
    vocab = _vocab(rng, T)
    topic = rng.integers(0, T, size=N)
    second = (topic + rng.integers(1, T, size=N)) % T
    popularity = rng.lognormal(0.0, 1.0, size=N)
    sponsored = rng.random(N) < cfg.sponsored_share
    ads_only = sponsored & (rng.random(N) < cfg.ads_only_share / max(cfg.sponsored_share, 1e-9))

    item_ids = [f"it{i:07d}" for i in range(N)]
    titles, bodies, tags, elig = [], [], [], []
    for i in range(N):
        t, s = topic[i], second[i]
        titles.append(" ".join(rng.choice(vocab[t], size=3)).title())
        bodies.append(" ".join(list(rng.choice(vocab[t], size=8)) + list(rng.choice(vocab[s], size=3))))
        tags.append([f"topic{t}", f"topic{s}"])
        elig.append(["ads"] if ads_only[i] else (["homefeed", "search", "ads"] if sponsored[i] else ["homefeed", "search"]))
    items = pd.DataFrame({"item_id": item_ids, "title": titles, "body": bodies, "tags": tags, "scenarios": elig, "image": None})

    # Per (scenario, topic) item pools with popularity-proportional sampling weights.
    in_scen = {
        "homefeed": ~ads_only,
        "search": ~ads_only,
        "ads": sponsored,
    }
    pools: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    for sname, mask in in_scen.items():
        for t in range(T):
            ids = np.flatnonzero(mask & ((topic == t) | (second == t)))
            if len(ids) == 0:
                ids = np.flatnonzero(mask)
            w = popularity[ids] * np.where(topic[ids] == t, 3.0, 1.0)
            pools[(sname, t)] = (ids, np.cumsum(w) / w.sum())
    global_pool = {s: (np.flatnonzero(m), np.cumsum(popularity[m]) / popularity[m].sum()) for s, m in in_scen.items()}

    # its own generator: the main stream, hence the data, is unchanged where nothing is late
    late_rng = np.random.default_rng([cfg.seed, 1])
    release = np.full(N, np.iinfo(np.int64).min, dtype=np.int64)
    if cfg.new_item_share > 0:
        late = late_rng.random(N) < cfg.new_item_share
        span = 86400 * 30
        release[late] = cfg.start_ts + (span * late_rng.uniform(cfg.new_item_release, 1.0, size=int(late.sum()))).astype(np.int64)

    def draw(pool: tuple[np.ndarray, np.ndarray], u: float, now: int | None = None, scen: str | None = None) -> int:
        ids, cdf = pool
        item = int(ids[min(np.searchsorted(cdf, u), len(ids) - 1)])
        for attempt in range(200):  # rejection of items not yet released; a pool of late items only falls back to the scenario's
            if now is None or release[item] <= now:
                break
            src = pool if attempt < 100 else global_pool[scen]
            item = int(src[0][min(np.searchsorted(src[1], late_rng.random()), len(src[0]) - 1)])
        return item

    rows_u, rows_i, rows_s, rows_a, rows_t = [], [], [], [], []
    user_interest = np.zeros((cfg.n_users, T))  # long-term interest weight per topic (ground truth)
    mix = np.asarray(cfg.scenario_mix, dtype=float)
    mix = mix / mix.sum()
    for u in range(cfg.n_users):
        n_ev = max(3, int(rng.poisson(cfg.events_per_user)))
        k = rng.integers(2, 4)
        interests = rng.choice(T, size=k, replace=False)
        weights = rng.dirichlet(np.ones(k) * 2)
        user_interest[u, interests] = weights
        user_mix = rng.dirichlet(mix * 20)
        intent = int(rng.choice(interests, p=weights))
        ts = cfg.start_ts + int(rng.integers(0, 86400 * 30))
        scen_draws = rng.choice(3, size=n_ev, p=user_mix)
        us = rng.random((n_ev, 4))
        for e in range(n_ev):
            if us[e, 0] > cfg.intent_persistence:
                intent = int(rng.choice(interests, p=weights)) if us[e, 1] < 0.85 else int(rng.integers(0, T))
            sname = SCENARIOS[scen_draws[e]]
            # the previous event's time: availability is decided before this event's time is drawn
            at = (ts, sname)
            if sname == "search":
                item = draw(pools[("search", intent)], us[e, 2], *at)
            elif sname == "homefeed":
                if us[e, 1] < 0.25:
                    item = draw(global_pool["homefeed"], us[e, 2], *at)
                else:
                    t = intent if us[e, 3] < 0.6 else int(rng.choice(interests, p=weights))
                    item = draw(pools[("homefeed", t)], us[e, 2], *at)
            else:
                item = draw(pools[("ads", intent)], us[e, 2], *at) if us[e, 1] < 0.85 else draw(global_pool["ads"], us[e, 2], *at)
            affinity = (topic[item] == intent) + 0.5 * (topic[item] in interests)
            r = us[e, 3]
            action = "share" if affinity >= 1 and r < 0.1 else "like" if affinity >= 1 and r < 0.4 else "skip" if affinity == 0 and r < 0.5 else "click"
            ts += int(rng.exponential(600)) + 1
            rows_u.append(f"u{u:07d}")
            rows_i.append(item_ids[item])
            rows_s.append(sname)
            rows_a.append(action)
            rows_t.append(ts)
    events = pd.DataFrame({"user_id": rows_u, "item_id": rows_i, "scenario": rows_s, "action": rows_a, "ts": np.asarray(rows_t, dtype=np.int64)})
    # recorded, not drawn: the generator's random stream (hence the data) is what it always was
    truth = {"user_ids": [f"u{u:07d}" for u in range(cfg.n_users)], "user_interest": user_interest,
             "item_ids": item_ids, "topic": topic, "second": second, "popularity": popularity}
    return RecData(f"synthetic-{cfg.n_users}u-seed{cfg.seed}", events, items, list(SCENARIOS), list(ACTIONS), truth=truth)
