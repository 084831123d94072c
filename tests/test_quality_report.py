"""bench/quality_report.py renders a self-contained page and survives partial reports."""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quality_report import write_html  # noqa: E402

SCENARIOS = ["homefeed", "search", "ads"]


def _metrics(base: float) -> dict:
    return {"ndcg@10": base, "hr@10": base * 2, "mrr": base * 1.1, "hr@50": base * 4, "ndcg@50": base * 1.5}


def _model(valid0: float) -> dict:
    curve = [{"epoch": 0.5, "step": 100, "loss": 5.0, "valid": _metrics(valid0), "seconds": 60.0},
             {"epoch": 1.0, "step": 200, "loss": 4.0, "valid": _metrics(valid0 + 0.01), "seconds": 120.0},
             {"epoch": 1.5, "step": 300, "loss": None, "valid": _metrics(valid0 + 0.02), "seconds": 180.0}]
    return {"train_s": 180.0, "total_s": 200.0, "steps": 300, "stopped": "early stopping", "best_step": 300,
            "best_valid": valid0 + 0.02, "curve": curve, "config": {}, "machine": {}}


def _entry(protocol: str) -> dict:
    scen = SCENARIOS if protocol == "multi-scenario" else []
    values = {"popularity": 0.05, "sasrec": 0.15, "redrec": 0.19}
    results = {m: {"per_scenario": {s: _metrics(v + 0.001 * i) for i, s in enumerate(scen)}, "overall": _metrics(v), "counts": {}}
               for m, v in values.items()}
    return {"protocol": "chronological-last-5" if scen else "leave-one-out (scenarios collapsed, whole catalogue)",
            "scenarios": scen, "dataset": {"name": "movielens-1m", "users": 6040, "items": 3883, "events": 1000209},
            "config": {}, "results": results, "models": {"sasrec": _model(0.10), "redrec": _model(0.12)},
            "ndcg@10_ratio_to_sasrec": {}}


REPORT = {"machine": {"cpu_count": 2, "cpu": "Test CPU", "platform": "Linux", "python": "3.11.7"},
          "datasets": {"movielens-1m": {"multi-scenario": _entry("multi-scenario"), "loo": _entry("loo")}}}


def test_renders_self_contained_page(tmp_path):
    out = write_html(REPORT, tmp_path / "q.html")
    assert out == tmp_path / "q.html" and out.exists()
    html = out.read_text()
    for name in ("popularity", "sasrec", "redrec", "homefeed", "search", "ads", "Test CPU"):
        assert name in html
    for number in ("0.1500", "0.1900", "0.0500", "0.3800", "1.27×", "0.1494", "0.1726"):
        assert number in html
    assert "<b>0.1900</b>" in html  # best NDCG@10 overall is bold
    # two charts per section, two sections, one polyline per trained model in each
    assert html.count("<svg") == 4
    assert html.count("<polyline") == 4 * 2
    assert not re.search(r"(src|href)\s*=\s*[\"']?https?://", html)
    assert "<script" not in html and "<link" not in html
    assert not list(tmp_path.glob("*.tmp"))


def test_partial_reports_render(tmp_path):
    report = copy.deepcopy(REPORT)
    for entry in report["datasets"]["movielens-1m"].values():
        del entry["models"]
        del entry["results"]["sasrec"]
    html = write_html(report, tmp_path / "p.html").read_text()
    assert "redrec" in html and "not run" in html and "no curve points" in html
    assert write_html({}, tmp_path / "e.html").read_text().count("No results yet") == 1


def test_runs_in_parallel_merge_into_one_report():
    """Parts of the bench run in parallel write their own files; merging keeps every other row,
    replaces the rows the part re-ran and recomputes the ratios from the merged rows."""
    from bench.quality import merge_report

    into = copy.deepcopy(REPORT)
    part = {"datasets": {"movielens-1m": {"loo": copy.deepcopy(_entry("loo"))}}}
    loo = part["datasets"]["movielens-1m"]["loo"]
    loo["results"] = {"redrec-next-item": copy.deepcopy(loo["results"]["redrec"])}
    loo["results"]["redrec-next-item"]["overall"]["ndcg@10"] = 0.18
    loo["models"] = {"redrec-next-item": _model(0.17)}
    merged = merge_report(into, part)["datasets"]["movielens-1m"]
    assert set(merged["loo"]["results"]) == {"popularity", "sasrec", "redrec", "redrec-next-item"}
    assert set(merged["loo"]["models"]) == {"sasrec", "redrec", "redrec-next-item"}
    assert abs(merged["loo"]["ndcg@10_ratio_to_sasrec"]["redrec-next-item"]["overall"] - 0.18 / 0.15) < 1e-9
    assert merged["multi-scenario"] == _entry("multi-scenario")  # untouched


def test_each_row_names_the_machine_it_was_measured_on(tmp_path):
    """GPU rows merged into CPU ones: training minutes compare only within a machine, so each row
    says where it ran and the header names every machine, not just the last run's."""
    report = copy.deepcopy(REPORT)
    models = report["datasets"]["movielens-1m"]["loo"]["models"]
    models["sasrec"]["machine"] = {"cpu": "Test CPU", "cpu_count": 2}
    models["redrec"]["machine"] = {"gpu": "Test GPU", "cpu": "Host CPU", "cpu_count": 16}
    html = write_html(report, tmp_path / "m.html").read_text()
    loo = html[html.index("movielens-1m &mdash; loo"):]
    row = lambda name: re.search(rf'<td class="name">{name}</td>.*?</tr>', loo, re.S).group(0)  # noqa: E731
    assert "Test CPU · 2 cores" in row("sasrec") and "Test GPU" not in row("sasrec")
    assert "Test GPU · Host CPU · 16 cores" in row("redrec")
    assert "rows measured on: Test CPU · 2 cores; Test GPU · Host CPU · 16 cores" in html


def test_a_run_from_another_machine_merges_as_its_own_section(tmp_path):
    """A whole rerun on another machine (SASRec and RED-Rec trained in one run on a 2-core CPU)
    sits beside the GPU rows: nothing of the main section is replaced, its ratios compare only
    models of that run, and the page renders it as leave-one-out with its own calibration."""
    from bench.quality import merge_report

    into = copy.deepcopy(REPORT)
    part = {"datasets": {"movielens-1m": {"loo": copy.deepcopy(_entry("loo"))}}}
    loo = part["datasets"]["movielens-1m"]["loo"]
    loo["results"]["sasrec"]["overall"]["ndcg@10"] = 0.16
    loo["results"]["redrec"]["overall"]["ndcg@10"] = 0.184
    loo["models"]["redrec"]["machine"] = {"cpu": "Other CPU", "cpu_count": 2}
    merged = merge_report(into, part, label="2-core CPU")["datasets"]["movielens-1m"]
    assert merged["loo"] == _entry("loo") and merged["multi-scenario"] == _entry("multi-scenario")
    cpu = merged["loo@2-core CPU"]
    assert abs(cpu["ndcg@10_ratio_to_sasrec"]["redrec"]["overall"] - 0.184 / 0.16) < 1e-9
    html = write_html({**into, "datasets": {"movielens-1m": merged}}, tmp_path / "l.html").read_text()
    section = html[html.index("movielens-1m &mdash; loo@2-core CPU"):]
    assert "RED-Rec NDCG@10 0.1840 (target ≥ 0.1800) — </span><span class=\"pass\">pass" in section
    assert "homefeed" not in section  # leave-one-out collapses the scenarios: one column group
    assert "Other CPU · 2 cores" in section
    for bad in ("", " ", "gpu@run"):
        with pytest.raises(ValueError, match="--merge-as"):
            merge_report(copy.deepcopy(REPORT), part, label=bad)


def _seed_run(seed: int, sasrec: float, steps: int) -> dict:
    """One run_protocol output of a seed: popularity (seed-independent) and a trained sasrec."""
    entry = _entry("multi-scenario")
    results = {"popularity": entry["results"]["popularity"], "sasrec": copy.deepcopy(entry["results"]["sasrec"])}
    results["sasrec"]["overall"]["ndcg@10"] = sasrec
    results["sasrec"]["per_scenario"]["search"]["ndcg@10"] = sasrec / 2
    model = {**_model(0.1), "steps": steps, "best_step": steps - 50, "train_s": 60.0 * (seed + 1)}
    return {"results": results, "models": {"sasrec": model}}


def test_seeds_aggregate_to_mean_and_sample_sd_and_keep_every_seed():
    from bench.quality import aggregate_seeds

    agg = aggregate_seeds({0: _seed_run(0, 0.10, 200), 1: _seed_run(1, 0.12, 300), 2: _seed_run(2, 0.17, 250)})
    sas = agg["results"]["sasrec"]
    assert sas["overall"]["ndcg@10"] == pytest.approx(0.13)
    assert sas["sd"]["overall"]["ndcg@10"] == pytest.approx(0.036055512754639895)  # ddof 1: sqrt(0.0026 / 2)
    assert sas["per_scenario"]["search"]["ndcg@10"] == pytest.approx(0.065)
    assert sas["sd"]["per_scenario"]["search"]["ndcg@10"] == pytest.approx(0.036055512754639895 / 2)
    assert sas["n"] == 3 and sas["seeds"] == [0, 1, 2]
    assert [sas["per_seed"][s]["overall"]["ndcg@10"] for s in ("0", "1", "2")] == [0.10, 0.12, 0.17]
    assert sas["overall"]["hr@10"] == pytest.approx(0.30)  # the other metrics average as well
    run = agg["models"]["sasrec"]
    assert run["steps"] == pytest.approx(250) and run["train_s"] == pytest.approx(120)
    assert [r["steps"] for r in run["per_seed"]] == [200, 300, 250] and [r["seed"] for r in run["per_seed"]] == [0, 1, 2]
    # popularity does not depend on the training seed: one run's row, no sd
    assert agg["results"]["popularity"] == _seed_run(0, 0.1, 1)["results"]["popularity"]
    # one seed: that run's rows as they were
    one = _seed_run(5, 0.11, 200)
    assert aggregate_seeds({5: one}) == {"results": one["results"], "models": one["models"]}


def test_a_multi_seed_row_renders_mean_sd_and_n(tmp_path):
    from bench.quality import aggregate_seeds

    agg = aggregate_seeds({0: _seed_run(0, 0.10, 200), 1: _seed_run(1, 0.12, 300), 2: _seed_run(2, 0.17, 250)})
    report = copy.deepcopy(REPORT)
    entry = report["datasets"]["movielens-1m"]["multi-scenario"]
    entry["results"].update(agg["results"])
    entry["models"].update(agg["models"])
    html = write_html(report, tmp_path / "s.html").read_text()
    row = re.search(r'<td class="name">sasrec</td>.*?</tr>', html, re.S).group(0)
    assert "0.1300 ± 0.0361 (3)" in row and "0.0650 ± 0.0180 (3)" in row and "200/300/250" in row
    pop = re.search(r'<td class="name">popularity</td>.*?</tr>', html, re.S).group(0)
    assert "±" not in pop


def test_unrunnable_and_time_capped_rows_move_to_history_and_stay_on_the_page(tmp_path):
    from bench.quality import to_history

    report = copy.deepcopy(REPORT)
    loo = report["datasets"]["movielens-1m"]["loo"]
    loo["results"]["redrec-previous"] = copy.deepcopy(loo["results"]["redrec"])
    loo["results"]["redrec-previous"]["overall"]["ndcg@10"] = 0.1348
    loo["models"]["redrec-previous"] = _model(0.11)
    loo["results"]["redrec-frozen-items"] = copy.deepcopy(loo["results"]["redrec"])
    loo["results"]["redrec-frozen-items"]["overall"]["ndcg@10"] = 0.1508
    loo["models"]["redrec-frozen-items"] = {**_model(0.12), "stopped": "time cap"}
    loo["ndcg@10_ratio_to_sasrec"] = {"redrec-previous": {"overall": 0.9}}
    to_history(report)
    assert set(loo["results"]) == {"popularity", "sasrec", "redrec"} and set(loo["models"]) == {"sasrec", "redrec"}
    assert "redrec-previous" not in loo["ndcg@10_ratio_to_sasrec"]
    reasons = {h["model"]: h["reason"] for h in report["history"]}
    assert reasons["redrec-frozen-items"] == "time cap" and "MODELS" in reasons["redrec-previous"]
    kept = {h["model"]: h for h in report["history"]}
    assert kept["redrec-previous"]["result"]["overall"]["ndcg@10"] == 0.1348 and kept["redrec-previous"]["run"]["steps"] == 300
    again = copy.deepcopy(report)
    assert to_history(again) == report  # idempotent: nothing left to move, nothing duplicated
    html = write_html(report, tmp_path / "h.html").read_text()
    tables, history = html.split("<h2>history</h2>")
    assert "redrec-previous" not in tables and "0.1348" not in tables and "0.1508" not in tables
    assert "redrec-previous" in history and "0.1348" in history and "0.1508" in history and "time cap" in history
    # a row that trains to convergence stays in its table
    assert "history" not in to_history(copy.deepcopy(REPORT))
