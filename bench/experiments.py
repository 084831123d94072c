"""Experiment designs measured on simulated users whose clicks follow a known truth, over lists the
real HTTP service returned.

    python bench/experiments.py             # about 10 minutes on 2 cores

World: the synthetic world (``redrec.data.synthetic``) with its ground truth; two rankers of a
known quality difference: a model trained on the world ("good") and a copy whose item embeddings
carry Gaussian noise ("worse", ``--noise``: the share of each vector's norm). Production is
"worse", the candidate "good": a real lift to detect.

Through the service (`bentoml serve` over Feast and Milvus Lite, all on 127.0.0.1): every user's
homefeed top-k with the serving config's arm on "worse", then on "good" (the config reloaded in
place, as a deploy does), then an interleaving experiment of the two (``--draws`` requests per
user: each request's team draft flips its own coins). The click model (``ClickModel``) gives each
list's true click probabilities, hence the true lift. One interleaving experiment is also run end
to end: clicks drawn for the interleaved responses are sent to ``/record_events`` with their
request ids and ``redrec.experiments.interleaving_report`` reads the serving log back.

Measured (numpy over the collected lists; ``redrec.experiments.simulate``):
- users needed for 80 % power at two-sided 5 % per design: A/B on clicks per user (the report's
  z-test of the difference), A/B with CUPED (each user's clicks in the ``--pre-days`` before, all
  on production) and interleaving (the exact sign test over users who preferred one arm).
  Planned by each test's normal approximation from a simulated pilot of ``--pilot-users`` users
  (each with both potential outcomes, so the effect is estimated paired), ``--repeats`` pilots,
  the median reported with min and max; then checked: ``--reps`` simulated experiments at the
  planned size, randomly assigned and tested as the reports test, give the power measured there,
  and interleaving is also run with a tenth of A/B's users. (A grid search of power curves by
  simulation alone took over 15 minutes for A/B at 10^5 users per experiment on 2 cores.)
- CUPED's variance reduction on the synthetic pre-period; the same plans for other spreads of
  user activity (``--sensitivity-sigma``), the between-user variance the designs differ on.
- the A/A false-positive rate when an owner looks every day for ``--aa-days`` days: the
  fixed-horizon z-test peeked daily vs the always-valid mSPRT p-value (its mixing variance
  planned from a pilot run), over ``--aa-runs`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="redrec-bench-bentoml-"))
for k, v in {"BENTOML_DO_NOT_TRACK": "True", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
    os.environ.setdefault(k, v)

from bench.serving import _cpu_model  # noqa: E402

ALPHA = 0.05


def train(data, work: Path, steps: int, seq_len: int) -> Path:
    from redrec.data import chronological_split, encode
    from redrec.experiment import ExperimentConfig, train_variant
    from redrec.model.checkpoint import export_checkpoint

    cfg = ExperimentConfig.model_validate({
        "dataset": "synthetic", "variants": ["redrec"],
        "model": {"user_tower": {"max_len": seq_len}},
        "train": {"epochs": 3, "max_steps": steps, "progress": False, "seed": 0}, "out_dir": str(work)})
    enc = encode(data)
    trainer, _ = train_variant(cfg, "redrec", data, enc, chronological_split(enc), work / "redrec", resume=False)
    return export_checkpoint(trainer.module, work / "model", enc.item_ids, {"variant": "redrec"})


def degrade(ckpt: Path, out: Path, noise: float, seed: int = 0) -> Path:
    """The same model with noisy item vectors: each gets Gaussian noise of ``noise`` times its norm."""
    shutil.copytree(ckpt, out)
    emb = np.load(ckpt / "item_embeddings.npy")
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(emb.shape).astype(np.float32)
    z *= (np.linalg.norm(emb, axis=1, keepdims=True) / np.linalg.norm(z, axis=1, keepdims=True)) * noise
    np.save(out / "item_embeddings.npy", (emb + z).astype(np.float32))
    return out


# ---- the designs' tests on one simulated experiment ------------------------------------------
def p_ab(u: dict) -> tuple[float, float]:
    """(two-sided p, estimate) of B - A in clicks per user: the report's raw lift test."""
    from redrec.experiments.stats import relative_lift

    t = u["treat"] == 1
    r = relative_lift(u["y"][t], u["y"][~t]).raw
    return r.p_value, r.diff


def p_cuped(u: dict) -> tuple[float, float]:
    """The same with CUPED on each user's pre-period clicks (the report's adjusted lift)."""
    from redrec.experiments.stats import relative_lift

    t = u["treat"] == 1
    r = relative_lift(u["y"][t], u["y"][~t], u["x"][t], u["x"][~t]).cuped
    return r.p_value, r.diff


def p_interleaving(ca: np.ndarray, cb: np.ndarray) -> tuple[float, float]:
    """The interleaving report's test: exact sign test over users who preferred one arm."""
    from scipy import stats

    w, l = int((cb > ca).sum()), int((cb < ca).sum())
    if w + l == 0:
        return 1.0, 0.0
    return float(stats.binomtest(w, w + l, 0.5).pvalue), w / (w + l) - 0.5


def measured_power(design: str, n: int, reps: int, rng, pop, cm, days: float, pre_days: float) -> float:
    """Share of ``reps`` simulated experiments of ``n`` users (random assignment, the designs' own
    tests) significant at ALPHA in the true direction."""
    from redrec.experiments.simulate import ab_users, interleaved_users

    hits = 0
    for _ in range(reps):
        if design == "interleaving":
            p, est = p_interleaving(*interleaved_users(rng, pop, cm, n, days))
        else:
            u = ab_users(rng, pop, cm, n, days, pre_days)
            p, est = (p_ab if design == "ab" else p_cuped)(u)
        hits += p < ALPHA and est * np.sign(pop.true_lift) > 0
    return hits / reps


def _aa_looks(rng, pop, cm, n: int, days: int):
    """One A/A experiment: per daily look, (difference of mean clicks per exposed user, its variance)."""
    from redrec.experiments.simulate import _clicks

    j = rng.integers(0, len(pop.pa), size=n)
    act = cm.activity(rng, n)
    treat = rng.random(n) < 0.5
    arrive = rng.integers(0, days, size=n)  # users come to the experiment over its days, as traffic does
    q = act[:, None] * pop.pa[j]
    y, s = np.zeros(n), np.zeros(n, int)
    out = []
    for day in range(days):
        sd = rng.poisson(act * cm.sessions_per_day) * (arrive <= day)
        y += _clicks(rng, sd, q)
        s += sd
        a, b = y[(s > 0) & ~treat], y[(s > 0) & treat]
        out.append((b.mean() - a.mean(), b.var(ddof=1) / len(b) + a.var(ddof=1) / len(a)))
    return np.array(out)


def aa_false_positives(runs: int, n: int, days: int, rng, pop, cm) -> dict:
    """Users arrive over the days (then return by their activity); the owner looks every day:
    the fixed-horizon z-test vs the always-valid mSPRT p-value (running minimum over the looks).
    The mixing variance is planned from a pilot run of the design (never from the runs tested)."""
    from redrec.experiments.stats import msprt_p_value, tau2_for_horizon, z_test_p

    pilot = np.mean([_aa_looks(np.random.default_rng([9, i]), pop, cm, n, days)[-1, 1] for i in range(5)])
    tau2 = tau2_for_horizon(pilot)
    looks = np.stack([_aa_looks(rng, pop, cm, n, days) for _ in range(runs)])  # [runs, days, 2]
    d, v = looks[..., 0], looks[..., 1]
    p_fixed = z_test_p(d, v)
    p_seq = msprt_p_value(d, v, tau2, looks_axis=1)
    return {"runs": runs, "users": n, "looks": days, "tau2": float(tau2),
            "fixed_horizon_peeked_daily": float((p_fixed < ALPHA).any(1).mean()),
            "fixed_horizon_once_at_end": float((p_fixed[:, -1] < ALPHA).mean()),
            "always_valid_peeked_daily": float((p_seq < ALPHA).any(1).mean())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1500, help="world users (profiles)")
    ap.add_argument("--items", type=int, default=400)
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--seq-len", type=int, default=30)
    ap.add_argument("--noise", type=float, default=1.0, help="degraded copy: item-vector noise, times its norm")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--draws", type=int, default=10, help="interleaved requests per user (each its own draft)")
    ap.add_argument("--days", type=float, default=7.0)
    ap.add_argument("--pre-days", type=float, default=14.0)
    ap.add_argument("--activity-sigma", type=float, default=1.2,
                    help="spread (sd of log) of per-user activity in the click model")
    ap.add_argument("--sensitivity-sigma", type=float, nargs="*", default=[0.8, 1.6],
                    help="other activity spreads to repeat the power searches with (fewer searches each)")
    ap.add_argument("--pilot-users", type=int, default=200_000, help="simulated users per planning pilot")
    ap.add_argument("--repeats", type=int, default=20, help="independent pilots planning the 80%% power size (median)")
    ap.add_argument("--reps", type=int, default=100, help="simulated experiments checking the power at a planned size")
    ap.add_argument("--aa-runs", type=int, default=1000)
    ap.add_argument("--aa-users", type=int, default=2000)
    ap.add_argument("--aa-days", type=int, default=14)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "experiments.json"))
    args = ap.parse_args()

    import yaml

    from redrec.data.synthetic import SyntheticConfig, generate
    from redrec.experiments.interleaving_report import analyse_interleaving
    from redrec.experiments.simulate import ClickModel, Population, Truth, collect
    from redrec.index.lite import LiteServer
    from redrec.pipeline.deploy import wait_serving
    from redrec.serving.feast_server import FeatureServer
    from redrec.serving.local import LocalServer
    from redrec.serving.stack import prepare, publish_checkpoint

    t_all = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="redrec-bench-experiments-"))
    data = generate(SyntheticConfig(n_users=args.users, n_items=args.items, seed=0))
    truth, cm = Truth(data.truth), ClickModel(activity_sigma=args.activity_sigma)
    t = time.perf_counter()
    good = train(data, work / "good", args.train_steps, args.seq_len)
    worse = degrade(good, work / "worse", args.noise)
    train_s = time.perf_counter() - t
    users = sorted(data.events["user_id"].astype(str).unique())
    k = args.k

    def probs(responses: list[dict]) -> np.ndarray:
        return np.stack([truth.click_probs(r["user_id"], r["items"], cm, k) for r in responses])

    timings = {"train_s": round(train_s, 1)}
    with LiteServer(work / "milvus.db") as uri:
        t = time.perf_counter()
        cfg_path = prepare(data, {"worse": worse, "good": good}, work, uri,
                           [{"name": "production", "model_version": "worse", "index_alias": "", "share": 1.0}],
                           experiment="bench", seq_len=args.seq_len, model_store=str(work / "store"),
                           serving={"batch_max_wait_ms": 2.0, "max_k": 50})
        publish_checkpoint(good, data, uri, "redrec_items_b", "good")
        with FeatureServer(work / "feast") as fs_url:
            cfg = yaml.safe_load(cfg_path.read_text())
            cfg["serving"]["feature_server_url"] = fs_url
            cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            log_dir = Path(cfg["serving"]["serving_log"]["dir"])
            with LocalServer(cfg_path) as srv:
                timings["setup_s"] = round(time.perf_counter() - t, 1)

                def serve(arms: list[dict], kind: str = "ab") -> None:
                    cfg["experiment"].update(type=kind, arms=arms)
                    text = yaml.safe_dump(cfg, sort_keys=False)
                    cfg_path.write_text(text)
                    wait_serving(srv.url, text, 120)

                t = time.perf_counter()
                asks = [{"user_id": u, "scenario": "homefeed", "k": k} for u in users]
                resp_a = collect(srv.url, asks)
                serve([{"name": "production", "model_version": "good", "index_alias": "redrec_items_b", "share": 1.0}])
                resp_b = collect(srv.url, asks)
                serve([{"name": "production", "model_version": "worse", "index_alias": "", "share": 0.5},
                       {"name": "candidate", "model_version": "good", "index_alias": "redrec_items_b", "share": 0.5}],
                      "interleaving")
                resp_i = collect(srv.url, asks * args.draws)
                timings["requests"] = len(resp_a) + len(resp_b) + len(resp_i)
                timings["collect_s"] = round(time.perf_counter() - t, 1)

                # the interleaved responses' teams, from the serving log (the response does not carry them)
                from redrec.experiments.log import read_serving_log

                log = read_serving_log(log_dir)
                teams = dict(zip(log["request_id"], log["teams"])) if "teams" in log else {}
                ok = [r for r in resp_i if isinstance(teams.get(r["request_id"]), list) and len(r["items"]) == k]
                by_user: dict[str, list[dict]] = {}
                for r in ok:
                    by_user.setdefault(r["user_id"], []).append(r)
                full = [u for u in users if len(by_user.get(u, [])) == args.draws
                        and not any(r["cold_start"] or r["fallback"] for r in (resp_a[users.index(u)], resp_b[users.index(u)]))]
                idx = [users.index(u) for u in full]
                pa, pb = probs([resp_a[i] for i in idx]), probs([resp_b[i] for i in idx])
                pi = np.stack([probs(by_user[u]) for u in full])
                team_b = np.stack([[[1 if t == "candidate" else 0 for t in teams[r["request_id"]]] for r in by_user[u]]
                                   for u in full])
                pop = Population(pa, pb, pi, team_b)

                # one interleaving experiment end to end: clicks on the served lists back through
                # /record_events, the report from the serving log
                import httpx

                rng = np.random.default_rng(1)
                act = dict(zip(full, cm.activity(rng, len(full))))
                events = []
                for u in full:
                    for r in by_user[u]:
                        q = np.clip(act[u] * truth.click_probs(u, r["items"], cm, k), 0, 1)
                        events += [{"user_id": u, "item_id": it, "scenario": "homefeed", "action": "click",
                                    "request_id": r["request_id"]} for it, c in zip(r["items"], rng.random(k) < q) if c]
                with httpx.Client(base_url=srv.url, timeout=60) as c:
                    for i in range(0, len(events), 500):
                        c.post("/record_events", json={"events": events[i:i + 500]}).raise_for_status()
                from redrec.serving.config import ServingConfig

                rep = analyse_interleaving(log_dir, ServingConfig.from_yaml(cfg_path).experiment)
                o = rep.preferences["overall"]
                end_to_end = {"users": o.users, "clicks_sent": len(events), "wins": o.wins, "ties": o.ties,
                              "losses": o.losses, "share_preferring_candidate": round(o.share, 4),
                              "ci": [round(o.ci_low, 4), round(o.ci_high, 4)], "p_value": o.p_value, "verdict": rep.verdict}

    # ---- the designs, in numpy over the collected lists ------------------------------------------
    t = time.perf_counter()
    rng = np.random.default_rng(2)
    from redrec.experiments.simulate import ab_users
    from redrec.experiments.stats import cuped

    from redrec.experiments.simulate import users_for_power

    def plan(cm_d: ClickModel, pilots: int) -> dict:
        res = {}
        for design in ("ab", "ab_cuped", "interleaving"):
            runs = [users_for_power(design, np.random.default_rng([3, i]), pop, cm_d, args.days, args.pre_days,
                                    args.pilot_users) for i in range(pilots)]
            sizes = [r["users"] for r in runs]
            res[design] = {"users_for_80pct_power": {"median": float(np.median(sizes)), "min": float(np.min(sizes)),
                                                      "max": float(np.max(sizes)), "pilots": pilots,
                                                      "pilot_users": args.pilot_users},
                           "effect": float(np.median([r["effect"] for r in runs])),
                           "counted_share": float(np.median([r["counted_share"] for r in runs]))}
            print(f"activity sigma {cm_d.activity_sigma}: {design}: {np.median(sizes):.0f} users for 80% power", flush=True)
        return res

    def verify(res: dict, cm_d: ClickModel) -> None:
        """Simulated experiments at the planned sizes: the power they reach, and interleaving's at
        a tenth of A/B's users (the issue's target, checked directly)."""
        rng_v = np.random.default_rng(6)
        for design, r in res.items():
            n = int(round(r["users_for_80pct_power"]["median"]))
            r["measured_power_at_planned_users"] = {"users": n, "experiments": args.reps,
                                                    "power": measured_power(design, n, args.reps, rng_v, pop, cm_d,
                                                                            args.days, args.pre_days)}
        n10 = int(round(res["ab"]["users_for_80pct_power"]["median"] / 10))
        res["interleaving"]["measured_power_at_a_tenth_of_ab_users"] = {
            "users": n10, "experiments": args.reps,
            "power": measured_power("interleaving", n10, args.reps, rng_v, pop, cm_d, args.days, args.pre_days)}

    big = ab_users(rng, pop, cm, 200_000, args.days, args.pre_days)
    _, theta, vr = cuped(big["y"], big["x"])
    cv = lambda y: round(float(y.std() / y.mean()), 3)  # noqa: E731 - the spread A/B has to average out
    results = plan(cm, args.repeats)
    verify(results, cm)
    # how the comparison moves with the spread of user activity (the between-user variance that an
    # A/B split averages out and interleaving cancels within each impression)
    sensitivity = {}
    for sigma in args.sensitivity_sigma:
        cm_s = ClickModel(activity_sigma=sigma)
        b = ab_users(np.random.default_rng(5), pop, cm_s, 200_000, args.days, args.pre_days)
        r = plan(cm_s, max(5, args.repeats // 4))
        ab_s = r["ab"]["users_for_80pct_power"]["median"]
        sensitivity[str(sigma)] = {"users_for_80pct_power": {d: round(v["users_for_80pct_power"]["median"])
                                                             for d, v in r.items()},
                                   "ratios_vs_ab": {d: round(ab_s / v["users_for_80pct_power"]["median"], 2)
                                                    for d, v in r.items()},
                                   "cuped_variance_reduction": round(float(cuped(b["y"], b["x"])[2]), 4),
                                   "clicks_per_exposed_user_cv": cv(b["y_a"])}
    power_s = time.perf_counter() - t
    t = time.perf_counter()
    aa = aa_false_positives(args.aa_runs, args.aa_users, args.aa_days, np.random.default_rng(4), pop, cm)
    aa_s = time.perf_counter() - t

    ab_n = results["ab"]["users_for_80pct_power"]["median"]
    out = {
        "benchmark": "experiments", "machine": f"{platform.machine()} {_cpu_model()}, {os.cpu_count()} cores",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "args": vars(args),
        "world": {"users": len(users), "users_simulated_from": len(full), "items": args.items,
                  "click_model": cm.__dict__, "true_lift_clicks_per_session": round(pop.true_lift, 4),
                  "clicks_per_session": {"production": round(float(pa.sum(1).mean()), 4),
                                         "candidate": round(float(pb.sum(1).mean()), 4)}},
        "designs": results,
        "ratios_vs_ab": {d: round(ab_n / results[d]["users_for_80pct_power"]["median"], 2) for d in results},
        "cuped": {"theta": round(float(theta), 4), "variance_reduction": round(float(vr), 4),
                  "users": int(len(big["y"]))},
        "clicks_per_exposed_user": {"mean": round(float(big["y_a"].mean()), 3), "cv": cv(big["y_a"])},
        "sensitivity_to_activity_sigma": sensitivity,
        "aa_daily_peeking": aa,
        "interleaving_end_to_end": end_to_end,
        "timings_s": {**timings, "power_s": round(power_s, 1), "aa_s": round(aa_s, 1),
                      "total_s": round(time.perf_counter() - t_all, 1)},
        "load_avg": list(os.getloadavg()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=float) + "\n")
    print(f"\ntrue lift of the candidate: {pop.true_lift:+.2%} clicks per session")
    print(f"{'design':<14} {'users for 80% power (median, min-max)':>40} {'x fewer than A/B':>18}")
    for d, r in results.items():
        u = r["users_for_80pct_power"]
        print(f"{d:<14} {u['median']:>22.0f} ({u['min']:.0f}-{u['max']:.0f}) {out['ratios_vs_ab'][d]:>18.1f}"
              f"   measured power there: {r['measured_power_at_planned_users']['power']:.0%}")
    tenth = results["interleaving"]["measured_power_at_a_tenth_of_ab_users"]
    print(f"interleaving with a tenth of A/B's users ({tenth['users']}): power {tenth['power']:.0%}")
    print(f"CUPED variance reduction: {vr:.1%}; clicks per exposed user: CV {cv(big['y_a'])}")
    for sigma, r in sensitivity.items():
        print(f"activity sigma {sigma}: users for 80% power {r['users_for_80pct_power']}, x fewer than A/B "
              f"{r['ratios_vs_ab']}, CUPED variance reduction {r['cuped_variance_reduction']:.1%}, clicks per user "
              f"CV {r['clicks_per_exposed_user_cv']}")
    print(f"A/A, {aa['looks']} daily looks, {aa['runs']} runs: fixed-horizon {aa['fixed_horizon_peeked_daily']:.1%}, "
          f"always-valid {aa['always_valid_peeked_daily']:.1%} (fixed, one look at the end: {aa['fixed_horizon_once_at_end']:.1%})")
    print(f"end to end through the service: {end_to_end}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
