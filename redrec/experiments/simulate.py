"""Users whose clicks follow a known truth, to measure experiment designs honestly.

The synthetic world (``redrec.data.synthetic``) records each user's long-term interest weight per
topic; an item's relevance to a user is the weight of its topic plus half that of its second
topic. A user shown a list examines rank r (0-based) with probability ``1 / (1 + r) **
position_decay`` and clicks an examined item with probability ``activity * (base + gain *
relevance)`` (at most 1). ``activity`` is a per-user lognormal with mean 1: heavy and light users,
the between-user variance an A/B split has to average out and CUPED removes with each user's
pre-period clicks; sessions per day are Poisson with mean ``activity * sessions_per_day``.

Lists come from the real HTTP service (``collect``): each simulated user is a profile of the
world (drawn with replacement) with a fresh activity, so a population of any size is simulated
over the lists the service returned for the world's users. Clicks on a fixed list over S sessions
are exactly Binomial(S, q_r) per rank, which keeps an experiment of 10^5 users to milliseconds.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClickModel:
    position_decay: float = 0.8
    base: float = 0.02
    gain: float = 0.5
    activity_sigma: float = 0.8  # sd of log(activity)
    sessions_per_day: float = 0.5

    def examine(self, k: int) -> np.ndarray:
        return 1.0 / (1.0 + np.arange(k)) ** self.position_decay

    def activity(self, rng: np.random.Generator, n: int) -> np.ndarray:
        s = self.activity_sigma
        return rng.lognormal(-s * s / 2, s, size=n)  # mean 1


class Truth:
    """The world's relevance of items to users (from ``RecData.truth``)."""

    def __init__(self, truth: dict):
        if truth is None:
            raise ValueError("the dataset has no ground truth: generate it with redrec.data.synthetic")
        self.user_row = {u: i for i, u in enumerate(truth["user_ids"])}
        self.item_row = {it: i for i, it in enumerate(truth["item_ids"])}
        self.interest = np.asarray(truth["user_interest"], float)
        self.topic, self.second = np.asarray(truth["topic"]), np.asarray(truth["second"])

    def relevance(self, user_id: str, items: list[str]) -> np.ndarray:
        w = self.interest[self.user_row[user_id]]
        rows = np.array([self.item_row[i] for i in items], dtype=int)
        return w[self.topic[rows]] + 0.5 * w[self.second[rows]]

    def click_probs(self, user_id: str, items: list[str], cm: ClickModel, k: int) -> np.ndarray:
        """Per rank, the click probability of a user of activity 1 (0 past the list's end)."""
        out = np.zeros(k)
        n = min(len(items), k)
        if n:
            out[:n] = cm.examine(k)[:n] * np.clip(cm.base + cm.gain * self.relevance(user_id, items[:n]), 0, 1)
        return out


async def _collect(url: str, asks: list[dict], concurrency: int, headers: dict | None, timeout_s: float) -> list[dict]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, headers=headers or {}) as client:
        async def one(body: dict) -> dict:
            async with sem:
                r = await client.post("/recommend", json=body)
                if r.status_code != 200:
                    raise RuntimeError(f"/recommend {body}: {r.status_code} {r.text[:300]}")
                return r.json()
        return list(await asyncio.gather(*(one(b) for b in asks)))


def collect(url: str, asks: list[dict], concurrency: int = 16, headers: dict | None = None,
            timeout_s: float = 60.0) -> list[dict]:
    """``/recommend`` for each body in ``asks`` (user_id, scenario, k), ``concurrency`` at a time."""
    return asyncio.run(_collect(url, asks, concurrency, headers, timeout_s))


@dataclass
class Population:
    """Per world profile j: click probabilities (activity 1) of arm A's list ``pa[j]`` and B's
    ``pb[j]`` ([P, k]), and of M interleaved lists ``pi[j, m]`` with ``team_b[j, m]`` (1 where B
    placed the item) ([P, M, k])."""

    pa: np.ndarray
    pb: np.ndarray
    pi: np.ndarray | None = None
    team_b: np.ndarray | None = None

    @property
    def true_lift(self) -> float:
        """B's expected clicks per session over A's, minus 1 (activity is independent of the
        profile, so it cancels)."""
        return float(self.pb.sum(1).mean() / self.pa.sum(1).mean() - 1)


def _clicks(rng: np.random.Generator, sessions: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Total clicks of each user over their sessions on one fixed list: per rank Binomial(S, q)."""
    return rng.binomial(sessions[:, None], np.clip(q, 0, 1)).sum(1)


def ab_users(rng: np.random.Generator, pop: Population, cm: ClickModel, n: int, days: float, pre_days: float,
             treat_share: float = 0.5, aa: bool = False) -> dict[str, np.ndarray]:
    """One A/B experiment of ``n`` users over ``days``: per user exposed (at least one session),
    ``treat`` (0/1), ``y`` clicks in the experiment, ``m`` sessions, ``x`` clicks in the
    ``pre_days`` before it (everybody on A then: the production ranker). Also both potential
    outcomes, ``y_a`` and ``y_b`` (the same user and sessions on either list, clicks drawn apart),
    for planning. ``aa``: B's list is A's."""
    j = rng.integers(0, len(pop.pa), size=n)
    act = cm.activity(rng, n)
    treat = (rng.random(n) < treat_share).astype(int)
    pre = rng.poisson(act * cm.sessions_per_day * pre_days)
    x = _clicks(rng, pre, act[:, None] * pop.pa[j])
    s = rng.poisson(act * cm.sessions_per_day * days)
    keep = s > 0
    j, act, treat, x, s = j[keep], act[keep], treat[keep], x[keep], s[keep]
    y_a = _clicks(rng, s, act[:, None] * pop.pa[j]).astype(float)
    y_b = y_a.copy() if aa else _clicks(rng, s, act[:, None] * pop.pb[j]).astype(float)
    return {"treat": treat, "y": np.where(treat == 1, y_b, y_a), "y_a": y_a, "y_b": y_b, "m": s.astype(float),
            "x": x.astype(float), "exposed": float(keep.mean())}


def interleaved_users(rng: np.random.Generator, pop: Population, cm: ClickModel, n: int,
                      days: float) -> tuple[np.ndarray, np.ndarray]:
    """One interleaving experiment of ``n`` users: per exposed user, clicks credited to A and to
    B. Each session shows one of the profile's M interleaved lists (the service's draft of a
    request), clicks drawn per shown item."""
    if pop.pi is None:
        raise ValueError("the population has no interleaved lists")
    j = rng.integers(0, len(pop.pa), size=n)
    act = cm.activity(rng, n)
    s = rng.poisson(act * cm.sessions_per_day * days)
    user = np.repeat(np.arange(n), s)
    m = rng.integers(0, pop.pi.shape[1], size=len(user))
    q = np.clip(act[user, None] * pop.pi[j[user], m], 0, 1)
    click = rng.random(q.shape) < q
    tb = pop.team_b[j[user], m].astype(bool)
    cb = np.bincount(user, weights=(click & tb).sum(1), minlength=n)
    ca = np.bincount(user, weights=(click & ~tb).sum(1), minlength=n)
    keep = s > 0
    return ca[keep], cb[keep]


def users_for_power(design: str, rng: np.random.Generator, pop: Population, cm: ClickModel, days: float,
                    pre_days: float, pilot_users: int = 200_000, alpha: float = 0.05, power: float = 0.8) -> dict:
    """Users (assigned, exposed or not) an experiment needs for ``power`` at two-sided ``alpha``,
    planned from a simulated pilot by the normal approximation of each design's test:
    - ``ab``: difference of mean clicks per exposed user, half the users per arm:
      ``n_arm = (z_a + z_b)^2 (var_a + var_b) / d^2``; the pilot gives each user both potential
      outcomes (same activity and sessions on either list), so ``d`` is estimated paired, with far
      less noise than two separate arms would give it;
    - ``ab_cuped``: the same on ``y - theta (x - mean x)``, ``theta`` pooled over both outcomes;
    - ``interleaving``: the sign test over users who preferred one arm, share ``p`` of them
      preferring B: ``n = ((z_a / 2 + z_b sqrt(p (1 - p))) / (p - 1/2))^2`` such users.
    Each is divided by the share of users it counts (exposed, or decided)."""
    from scipy import stats

    za, zb = stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(power)
    if design in ("ab", "ab_cuped"):
        u = ab_users(rng, pop, cm, pilot_users, days, pre_days)
        ya, yb = u["y_a"], u["y_b"]
        if design == "ab_cuped":
            both, x2 = np.concatenate([ya, yb]), np.concatenate([u["x"], u["x"]])
            xc = x2 - x2.mean()
            theta = float(xc @ (both - both.mean()) / (xc @ xc))
            ya, yb = ya - theta * (u["x"] - u["x"].mean()), yb - theta * (u["x"] - u["x"].mean())
        d = float((yb - ya).mean())
        n_arm = (za + zb) ** 2 * (ya.var(ddof=1) + yb.var(ddof=1)) / d**2
        return {"users": float(2 * n_arm / u["exposed"]), "effect": d, "counted_share": u["exposed"]}
    ca, cb = interleaved_users(rng, pop, cm, pilot_users, days)
    w, l = int((cb > ca).sum()), int((cb < ca).sum())
    p = w / (w + l)
    n_dec = ((za / 2 + zb * np.sqrt(p * (1 - p))) / (p - 0.5)) ** 2
    decided = (w + l) / pilot_users
    return {"users": float(n_dec / decided), "effect": p - 0.5, "counted_share": decided}
