"""The experiment simulator (redrec.experiments.simulate) behind bench/experiments.py: clicks follow
the world's truth, and a size planned for 80 % power reaches it when experiments are simulated."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from redrec.data.synthetic import SyntheticConfig, generate
from redrec.experiments.interleaving import draft_seed, team_draft
from redrec.experiments.simulate import ClickModel, Population, Truth, ab_users, interleaved_users, users_for_power
from redrec.experiments.stats import relative_lift


@pytest.fixture(scope="module")
def population():
    """Lists ranked by the world's truth (B) and the same ranking from its 6th item on (A), interleaved
    per request: a small, known quality difference."""
    data = generate(SyntheticConfig(n_users=300, n_items=200, seed=11))
    truth, cm = Truth(data.truth), ClickModel()
    items = list(data.truth["item_ids"])
    pa, pb, pi, tb = [], [], [], []
    for u in data.truth["user_ids"]:
        ranked = [items[i] for i in np.argsort(-truth.relevance(u, items), kind="stable")]
        best, worse = ranked[:10], ranked[5:15]
        pa.append(truth.click_probs(u, worse, cm, 10))
        pb.append(truth.click_probs(u, best, cm, 10))
        draws = [team_draft(worse, best, 10, draft_seed("sim", f"{u}-{m}")) for m in range(4)]
        pi.append([truth.click_probs(u, it, cm, 10) for it, _ in draws])
        tb.append([t for _, t in draws])
    return Population(np.array(pa), np.array(pb), np.array(pi), np.array(tb)), cm, truth, data


def test_truth_is_the_generators_and_clicks_follow_it(population):
    pop, cm, truth, data = population
    # the recorded interests are the ones the events were drawn from: users act on their topics
    ev = data.events.merge(data.items[["item_id"]].assign(topic=data.truth["topic"]), on="item_id")
    row = ev["user_id"].map(truth.user_row).to_numpy()
    w = truth.interest[row, ev["topic"].to_numpy()]
    assert (w > 0).mean() > 0.6  # most events are on one of the user's topics; a random topic would be ~0.2
    # the better list wins by a known amount
    assert 0.05 < pop.true_lift < 0.5
    # a population's clicks match their expectation (activity has mean 1)
    u = ab_users(np.random.default_rng(0), pop, cm, 100_000, days=7, pre_days=14)
    rng = np.random.default_rng(1)
    act, j = cm.activity(rng, 400_000), rng.integers(0, len(pop.pa), 400_000)
    expected = np.mean(cm.sessions_per_day * 7 * act * np.clip(act[:, None] * pop.pa[j], 0, 1).sum(1))
    assert abs(u["y_a"].mean() * u["exposed"] / expected - 1) < 0.03


@pytest.mark.parametrize("design", ["ab", "ab_cuped", "interleaving"])
def test_a_planned_size_reaches_its_power(population, design):
    pop, cm, _, _ = population
    plan = users_for_power(design, np.random.default_rng(1), pop, cm, days=3, pre_days=14, pilot_users=100_000)
    n = int(plan["users"])
    assert 300 < n < 50_000
    rng = np.random.default_rng(2)
    hits = 0
    for _ in range(200):
        if design == "interleaving":
            ca, cb = interleaved_users(rng, pop, cm, n, days=3)
            w, l = int((cb > ca).sum()), int((cb < ca).sum())
            hits += stats.binomtest(w, w + l, 0.5).pvalue < 0.05 and w > l
        else:
            u = ab_users(rng, pop, cm, n, days=3, pre_days=14)
            t = u["treat"] == 1
            r = relative_lift(u["y"][t], u["y"][~t], u["x"][t], u["x"][~t])
            est = r.cuped if design == "ab_cuped" else r.raw
            hits += est.p_value < 0.05 and est.value > 0
    assert 0.68 <= hits / 200 <= 0.92, (design, n, hits)
