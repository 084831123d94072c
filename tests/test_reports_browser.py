"""The reports people read, opened in headless Chromium: the A/B report and the offline quality
report load without console errors or outside requests, show their key numbers and draw their
plots. Screenshots: build/screenshots/. (The drift pages: tests/test_drift.py, beside the model
their runs need.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from browser_util import Browser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is not a package of the install


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    try:
        yield b
    finally:
        b.close()


def test_ab_report_in_a_browser(browser, tmp_path):
    from test_experiments import simulate

    from redrec.experiments.assignment import HOLDOUT, ExperimentSpec
    from redrec.experiments.report import analyse, write_report

    sp = ExperimentSpec(name="rollout", holdout_share=0.1, arms=[{"name": "control", "model_version": "v1", "share": 0.5},
                                                                  {"name": "treat", "model_version": "v2", "share": 0.5}])
    # a pre-period for CUPED; the treatment is slower (a guardrail it breaches)
    simulate(tmp_path / "log", sp, {"control": 0.10, "treat": 0.13, HOLDOUT: 0.08}, days=5, pre_rate=5.0,
             latency={"control": 20.0, "treat": 26.0, HOLDOUT: 20.0}, fallback={"control": 0.02, "treat": 0.02, HOLDOUT: 0.02})
    rep = analyse(tmp_path / "log", sp)
    paths = write_report(rep, tmp_path / "out")
    page = browser.open(paths["html"], "ab-report")
    assert page.console_errors == [] and page.failed_requests == []
    text = page.text()
    lift = next(l for l in rep.lifts["overall"] if l.metric == "ctr" and l.arm == "treat")
    assert "treat" in text and "control" in text and "rollout" in text
    assert f"{lift.value * 100:+.2f}%" in text, text[:2000]  # the lift, as the table prints it
    # the lift plots are drawn: an svg per metric with a mark per arm and scenario
    assert page.count("svg") >= 2 and page.count("svg rect, svg line, svg circle") >= 4
    # sample ratio: a bar per group (control, treat, holdout) with its expected count marked
    assert page.count("#srm-chart rect") == 3 and page.count("#srm-chart line") == 3
    assert "no mismatch" in page.page.inner_text("#srm")
    # daily exposure: a stacked bar per day and group, the days as the log has them
    assert len(rep.daily) == 5 and page.count("#daily-chart rect title") == 5 * 3
    assert page.count("#daily-chart rect") == 5 * 3 + 3  # bars + legend
    # raw vs CUPED lift, variance reduction, always-valid p/CI with the may-stop verdict, BH p
    row = page.page.locator('table.lifts[data-scope="overall"] tr', has_text="hit_rate").first.inner_text()
    hit = next(l for l in rep.lifts["overall"] if l.metric == "hit_rate" and l.arm == "treat")
    assert hit.variance_reduction > 0 and hit.cuped_value != hit.value
    for shown in (f"{hit.value * 100:+.2f}%", f"{hit.cuped_value * 100:+.2f}%", f"{hit.variance_reduction * 100:.1f}%",
                  f"{hit.seq_p_value:.4g}", f"[{hit.seq_ci_low * 100:+.2f}%, {hit.seq_ci_high * 100:+.2f}%]",
                  f"{hit.cuped_p_adjusted:.4g}"):
        assert shown in row, (shown, row)
    headers = page.page.locator("table.lifts").first.locator("th").all_inner_texts()
    for h in ("CUPED lift", "variance reduction", "always-valid p", "always-valid CI", "may stop", "BH-adjusted p"):
        assert h in headers, headers
    assert ("yes" if hit.may_stop else "no") == page.page.locator('table.lifts[data-scope="overall"] tr', has_text="hit_rate").first.locator("td.stop").inner_text()
    # the guardrail: latency flagged in the table and in the verdict, never as a success
    lat = page.page.locator('table.lifts[data-scope="overall"] tr', has_text="latency_ms").first
    assert "GUARDRAIL BREACHED" in lat.inner_text() and "bad" in lat.get_attribute("class")
    verdict = page.page.locator("#decisions tr", has_text="treat").inner_text()
    assert "guardrail breached" in verdict and "overall/latency_ms" in verdict and "ctr" in verdict, verdict
    assert page.screenshot.stat().st_size > 10_000


def test_quality_report_in_a_browser(browser, tmp_path):
    from bench.quality_report import write_html

    report = json.loads((ROOT / "bench" / "results" / "quality.json").read_text())
    path = write_html(report, tmp_path / "quality.html")
    page = browser.open(path, "quality-report")
    assert page.console_errors == [] and page.failed_requests == []
    text = page.text()
    sasrec = report["datasets"]["movielens-1m"]["loo"]["results"]["sasrec"]["overall"]["ndcg@10"]
    assert f"{sasrec:.4f}" in text, text[:3000]
    assert page.count("svg") >= 2 and page.count("svg polyline, svg path") >= 2  # validation curves drawn
    assert page.screenshot.stat().st_size > 10_000


def test_evaluation_page_in_a_browser(browser, tmp_path):
    """The evaluation step's metrics as the page `redrec pipeline run` writes: a bar per model and
    scenario for NDCG@10 and HR@10, the numbers in the table."""
    from redrec.reports.evaluation import write_evaluation_html

    scen = ["homefeed", "search", "ads"]
    def res(base):
        return {"overall": {"ndcg@10": base, "hr@10": 2 * base, "mrr": base / 2},
                "per_scenario": {s: {"ndcg@10": base + 0.01 * i, "hr@10": 2 * base, "mrr": base / 2} for i, s in enumerate(scen)}}
    curve = [{"epoch": e, "step": 40 * e, "loss": 5.0 - e / 2, "valid": {"ndcg@10": 0.1 + 0.01 * e, "hr@10": 0.2 + 0.02 * e}}
             for e in range(1, 6)]
    metrics = {"candidate_version": "v9", "production_version": "v8", "candidate_curve": curve,
               "results": {"candidate": res(0.2), "popularity": res(0.06), "production": res(0.18)}}
    page = browser.open(write_evaluation_html(metrics, tmp_path / "evaluation.html"), "evaluation")
    assert page.console_errors == [] and page.failed_requests == []
    assert page.count(".metric-chart") == 2
    assert page.count("#chart-ndcg-10 rect title") == 3 * 4  # 3 models x (3 scenarios + overall)
    text = page.text()
    assert "Evaluation of model v9" in text and "0.2200" in text and "0.0600" in text
    # the validation curve: NDCG@10 and HR@10 lines, and the loss, over 5 evaluations
    assert page.count("#curves svg.line-chart") == 2 and page.count("#curves polyline") == 3
    assert "5 evaluations" in text and "optimizer steps" in text
