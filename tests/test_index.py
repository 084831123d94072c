"""Milvus Lite for real: publish, verify, swap, rollback, retention, refusals, concurrent search."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest


from redrec.index import (  # noqa: E402
    IndexConfig,
    LiteServer,
    PublishError,
    PublishRefused,
    RollbackError,
    close_clients,
    current_collection,
    current_version,
    exact_topk,
    list_versions,
    publish,
    rollback,
    search,
)
import redrec.index.milvus as milvus_mod  # noqa: E402

DIM = 16
SCEN = ["homefeed", "search", "ads"]


def world(n: int, seed: int, clusters: int = 40):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((clusters, DIM))
    x = (c[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, DIM))).astype(np.float32)
    ids = [f"it{i:05d}" for i in range(n)]
    scen = [["ads"] if i % 7 == 0 else (["homefeed", "search", "ads"] if i % 3 == 0 else ["homefeed", "search"]) for i in range(n)]
    return ids, x, scen


@pytest.fixture
def cfg(tmp_path):
    c = IndexConfig(uri=str(tmp_path / "milvus.db"), dim=DIM, flat_below=1000, keep_versions=3, verify_sample=50)
    yield c
    close_clients(c.uri)


def _state(cfg):
    return current_collection(cfg), sorted(v.name for v in list_versions(cfg))


def test_publish_swap_rollback_and_retention(cfg):
    ids, x, scen = world(2500, 0)
    assert current_version(cfg) is None
    res = {}
    for v in ("1", "2", "3", "4"):
        # each version's vectors differ; item it00001's vector tells which version is served
        xv = x.copy()
        xv[1] = np.eye(DIM, dtype=np.float32)[int(v)]
        res[v] = publish(cfg, v, ids, xv, scen, set(ids))
        assert current_version(cfg) == v
        assert res[v].recall >= cfg.min_recall
        assert res[v].index_params["index_type"] == "IVF_FLAT"
    assert res["2"].previous_collection == "redrec_items_v1"
    # keep_versions=3: v1 dropped when v4 went live, the rest kept
    assert res["4"].dropped == ["redrec_items_v1"]
    assert _state(cfg) == ("redrec_items_v4", ["redrec_items_v2", "redrec_items_v3", "redrec_items_v4"])

    # K=4 query vectors: the max over them finds the marker of v4 with cosine 1
    hits = search(cfg, np.eye(DIM, dtype=np.float32)[1:5], "homefeed", 1)
    assert hits[0][0] == "it00001" and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert rollback(cfg) == ("4", "3")
    assert current_version(cfg) == "3"
    assert search(cfg, np.eye(DIM, dtype=np.float32)[[3]], "homefeed", 1)[0] == ("it00001", pytest.approx(1.0, abs=1e-5))
    assert rollback(cfg) == ("3", "2")
    with pytest.raises(RollbackError, match="no version older than redrec_items_v2"):
        rollback(cfg)
    assert current_version(cfg) == "2"
    # the served version is never dropped, even when it is the oldest kept
    publish(cfg, "5", ids, x, scen, set(ids))
    assert current_version(cfg) == "5"
    names = [v.name for v in list_versions(cfg)]
    assert "redrec_items_v2" not in names and len(names) == 3


def test_search_is_max_over_queries_filtered_and_excluding(cfg):
    ids, x, scen = world(800, 1)  # < flat_below: an exact FLAT index, so results must equal numpy
    publish(cfg, "1", ids, x, scen, set(ids))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    rng = np.random.default_rng(5)
    q = rng.standard_normal((3, DIM)).astype(np.float32)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    for scenario in SCEN:
        eligible = np.array([scenario in s for s in scen])
        score = (qn @ xn.T).max(axis=0)
        order = [i for i in np.argsort(-score) if eligible[i]]
        exclude = [ids[i] for i in order[:4]]
        want = [(ids[i], float(score[i])) for i in order[4:14]]
        got = search(cfg, q, scenario, 10, exclude_ids=exclude)
        assert [g[0] for g in got] == [w[0] for w in want]
        np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], atol=1e-5)
        # many exclusions (beyond the server's top-k limit) go into the filter instead
        small = cfg.model_copy(update={"max_topk": 12})
        got2 = search(small, q, scenario, 10, exclude_ids=exclude)
        assert [g[0] for g in got2] == [w[0] for w in want]
        # and so do more than overfetch_max_exclusions of them (the serving path for long histories)
        got3 = search(cfg.model_copy(update={"overfetch_max_exclusions": 0}), q, scenario, 10, exclude_ids=exclude)
        assert [g[0] for g in got3] == [w[0] for w in want]
    with pytest.raises(ValueError, match="scenario 'shop'"):
        search(cfg, q, "shop", 5)
    with pytest.raises(ValueError, match="dim 8"):
        search(cfg, q[:, :8], "ads", 5)


def test_a_batch_of_requests_is_one_search_per_scenario_and_equals_numpy(cfg, monkeypatch):
    """search_paired_many (a serving micro-batch): requests of different scenarios, k, K and
    exclusions get exactly the numpy answer each, from one Milvus search call per scenario; a
    request with more exclusions than over-fetching allows is searched alone with a filter."""
    from redrec.index.search import Query, search_paired_many

    ids, x, scen = world(800, 2)  # exact FLAT index
    publish(cfg, "1", ids, x, scen, set(ids))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    rng = np.random.default_rng(7)
    queries = []
    for n in range(12):
        q = rng.standard_normal((1 + n % 3, DIM)).astype(np.float32)
        exclude = {ids[int(i)] for i in rng.choice(len(ids), n % 5 * 3, replace=False)}
        queries.append(Query(q, SCEN[n % 3], 3 + n, exclude))
    queries.append(Query(rng.standard_normal((2, DIM)), "ads", 5, set(ids[:40])))  # > overfetch_max_exclusions
    calls = []
    raw = milvus_mod._search_raw
    search_mod = importlib.import_module("redrec.index.search")  # the package exports a function of that name
    monkeypatch.setattr(search_mod, "_search_raw", lambda *a, **kw: calls.append(len(a[2])) or raw(*a, **kw))
    got = search_paired_many(cfg, "1", queries)
    assert sorted(calls) == sorted([sum(len(q.vectors) for q in queries[:12] if q.scenario == s) for s in SCEN] + [2])
    for q, res in zip(queries, got):
        qn = q.vectors / np.linalg.norm(q.vectors, axis=1, keepdims=True)
        score = (qn @ xn.T).max(axis=0)
        want = [ids[i] for i in np.argsort(-score) if q.scenario in scen[i] and ids[i] not in q.exclude][: q.k]
        assert [i for i, _ in res.hits] == want
        assert res.index_version == "1" and res.collection == current_collection(cfg)


@pytest.mark.parametrize("metric", ["COSINE", "IP", "L2"])
def test_a_small_collection_is_searched_in_process_exactly_as_milvus_searches_it(tmp_path, metric, monkeypatch):
    """exact_max_items: a ready collection that small is read from Milvus once (in the background
    on first use) and then searched in process: the same hits and scores as Milvus' exact FLAT
    search for every request of a batch (scenarios, k, K, exclusions), with no Milvus search call.
    A larger collection is not copied; a new version gets a copy of its own."""
    from redrec.index import exact
    from redrec.index.search import Query, collection_info, search_paired_many

    cfg = IndexConfig(uri=str(tmp_path / "milvus.db"), dim=DIM, flat_below=1000, verify_sample=50, metric=metric)
    try:
        ids, x, scen = world(800, 3)  # exact FLAT index in Milvus
        publish(cfg, "1", ids, x, scen, set(ids))
        rng = np.random.default_rng(11)
        queries = [Query(rng.standard_normal((1 + n % 3, DIM)), SCEN[n % 3], 3 + n,
                         {ids[int(i)] for i in rng.choice(len(ids), n % 4 * 10, replace=False)}) for n in range(9)]
        by_milvus = search_paired_many(cfg, "1", queries)

        small = cfg.model_copy(update={"exact_max_items": 800})
        info = collection_info(small, current_collection(cfg))
        assert exact.copy_of(small, info) is None  # the first use starts the copy; Milvus answers meanwhile
        deadline = time.monotonic() + 60
        while not exact.loaded(small, "1") and time.monotonic() < deadline:
            time.sleep(0.05)
        copy = exact.copy_of(small, info)
        assert copy is not None and sorted(copy.ids) == ids
        assert {f: int(m.sum()) for f, m in copy.eligible.items()} == {
            info.scenarios[s]: sum(s in sc for sc in scen) for s in SCEN}

        search_mod = importlib.import_module("redrec.index.search")
        monkeypatch.setattr(search_mod, "_search_raw", lambda *a, **kw: pytest.fail("searched Milvus"))
        in_process = search_paired_many(small, "1", queries)
        for q, m, e in zip(queries, by_milvus, in_process):
            assert [i for i, _ in e.hits] == [i for i, _ in m.hits], q.scenario
            np.testing.assert_allclose([s for _, s in e.hits], [s for _, s in m.hits], rtol=1e-4, atol=1e-4)
            assert len(e.hits) == q.k and not q.exclude & {i for i, _ in e.hits}
            assert e.collection == m.collection and e.index_version == "1"

        # a new version is a new copy; the old one stays for the arms still paired with it
        publish(cfg, "2", ids, x[::-1].copy(), scen, set(ids))
        assert exact.load(small, collection_info(small, current_collection(cfg))).version == "2"
        assert exact.loaded(small, "1") and exact.loaded(small, "2")
        # one item more than the limit: not copied, searched in Milvus
        exact.forget(cfg.uri)
        assert exact.load(cfg.model_copy(update={"exact_max_items": 799}), info) is None
        assert not exact.loaded(small, "1")
        monkeypatch.undo()
        assert [h.hits for h in search_paired_many(small.model_copy(update={"exact_max_items": 799}), "1", queries)] == [
            h.hits for h in by_milvus]
    finally:
        exact.forget(cfg.uri)
        close_clients(cfg.uri)


def test_a_copy_that_fails_to_read_is_searched_in_milvus_and_not_reread_per_search(cfg, monkeypatch):
    from redrec.index import exact
    from redrec.index.search import collection_info, search_paired

    ids, x, scen = world(300, 4)
    publish(cfg, "1", ids, x, scen, set(ids))
    small = cfg.model_copy(update={"exact_max_items": 1000})
    reads = []

    def broken(*a):
        reads.append(1)
        raise ConnectionError("planted: Milvus busy")

    monkeypatch.setattr(exact, "_read", broken)
    try:
        q = np.random.default_rng(0).standard_normal((2, DIM))
        want = search_paired(cfg, "1", q, "ads", 5).hits
        for _ in range(5):
            assert search_paired(small, "1", q, "ads", 5).hits == want
            exact._loader.submit(lambda: None).result()  # the background read has run
        assert len(reads) == 1 and not exact.loaded(small, "1")
        monkeypatch.undo()  # Milvus answers again: read, and then searched in process
        exact.forget(cfg.uri)
        assert exact.load(small, collection_info(small, current_collection(cfg))) is not None
        assert [i for i, _ in search_paired(small, "1", q, "ads", 5).hits] == [i for i, _ in want]
    finally:
        exact.forget(cfg.uri)


def test_bad_publications_are_refused_and_change_nothing(cfg):
    ids, x, scen = world(1200, 2)
    publish(cfg, "1", ids, x, scen, set(ids))
    before = _state(cfg)

    def refused(match, **kw):
        args = dict(model_version="2", item_ids=ids, vectors=x, scenarios=scen, catalogue_ids=set(ids))
        args.update(kw)
        c = args.pop("cfg", cfg)
        with pytest.raises(PublishRefused, match=match):
            publish(c, **args)
        assert _state(cfg) == before

    refused(r"dimension mismatch: the model's vectors have dim 8, the index is configured for dim 16", vectors=x[:, :8])
    dup = ids[:-1] + ["it00003"]
    refused(r"duplicate item ids \(1\): 'it00003'", item_ids=dup, catalogue_ids=set(dup))
    xn = x.copy()
    xn[7, 2] = np.nan
    xn[9, 0] = np.inf
    refused(r"NaN or infinite vector\(s\) for 2 item\(s\): 'it00007', 'it00009'", vectors=xn)
    refused(r"1 item\(s\) missing from the catalogue: 'it00011'", catalogue_ids=set(ids) - {"it00011"})
    refused(r"eligible in no scenario: 'it00000'", scenarios=[[]] + scen[1:])
    # eligibility as numpy arrays (what a parquet catalogue gives) and None are read the same way
    refused(r"2 item\(s\) are eligible in no scenario: 'it00000', 'it00005'",
            scenarios=[np.array([])] + [np.array(x) for x in scen[1:5]] + [None] + [np.array(x) for x in scen[6:]])
    refused(r"zero vector", vectors=np.vstack([np.zeros((1, DIM), np.float32), x[1:]]))
    refused(r"model version '2\.0'", model_version="2.0")
    refused(r"already published and served \(redrec_items_v1\)", model_version="1")
    # the served collection has dim 16 / COSINE: a model with another dim or metric is refused
    refused(r"served collection redrec_items_v1 has dim 16 / metric COSINE, the model has dim 8",
            cfg=cfg.model_copy(update={"dim": 8}), vectors=x[:, :8])
    refused(r"metric COSINE, the model has dim 16 / metric IP", cfg=cfg.model_copy(update={"metric": "IP"}))
    assert current_version(cfg) == "1"
    assert search(cfg, x[:1], "homefeed", 3)


def test_failed_publications_leave_the_alias(cfg, monkeypatch):
    ids, x, scen = world(1500, 3)
    publish(cfg, "1", ids, x, scen, set(ids))
    before = _state(cfg)
    real_insert = milvus_mod._insert

    def half_then_crash(c, name, item_ids, vectors, elig):
        h = len(item_ids) // 2
        real_insert(c, name, item_ids[:h], vectors[:h], {f: m[:h] for f, m in elig.items()})
        raise ConnectionError("server went away")

    monkeypatch.setattr(milvus_mod, "_insert", half_then_crash)
    with pytest.raises(PublishError, match=r"redrec_items_v2 failed at step 'insert': ConnectionError: server went away; "
                                            r"'redrec_items' still serves redrec_items_v1"):
        publish(cfg, "2", ids, x, scen, set(ids))
    assert _state(cfg) == before

    def short_insert(c, name, item_ids, vectors, elig):  # a silent partial write
        h = len(item_ids) - 10
        real_insert(c, name, item_ids[:h], vectors[:h], {f: m[:h] for f, m in elig.items()})

    monkeypatch.setattr(milvus_mod, "_insert", short_insert)
    with pytest.raises(PublishError, match=r"partial publication: redrec_items_v2 holds 1490 of 1500 rows"):
        publish(cfg, "2", ids, x, scen, set(ids))
    assert _state(cfg) == before
    monkeypatch.setattr(milvus_mod, "_insert", real_insert)

    # an index that cannot reach the recall target is never served
    rng = np.random.default_rng(0)
    iso = rng.standard_normal((1500, DIM)).astype(np.float32)
    strict = cfg.model_copy(update={"nlist": 64, "nprobe": 1, "max_nprobe": 1})
    with pytest.raises(PublishError, match=r"step 'verify': recall@10 0\.\d+ < 0\.95"):
        publish(strict, "2", ids, iso, scen, set(ids))
    assert _state(cfg) == before
    # the same data with nprobe allowed to grow passes
    r = publish(cfg.model_copy(update={"nlist": 64, "nprobe": 1}), "2", ids, iso, scen, set(ids))
    assert r.recall >= 0.95 and r.search_params["nprobe"] > 1
    assert current_version(cfg) == "2"


def test_concurrent_searches_during_swaps_see_no_error(cfg):
    # keep_versions=2: after the rollback, publishing v4 drops v2, served until that very swap
    cfg = cfg.model_copy(update={"keep_versions": 2})
    ids, x, scen = world(2000, 4)
    publish(cfg, "1", ids, x, scen, set(ids))
    errors, counts, stop = [], [0] * 3, threading.Event()
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((3, 2, DIM)).astype(np.float32)

    def hammer(j):
        while not stop.is_set():
            try:
                hits = search(cfg, queries[j], SCEN[j], 10, exclude_ids=ids[:5])
                assert len(hits) == 10
                counts[j] += 1
            except Exception as e:  # noqa: BLE001 - any error fails the test
                errors.append(repr(e))
                return

    threads = [threading.Thread(target=hammer, args=(j,)) for j in range(3)]
    for t in threads:
        t.start()
    try:
        publish(cfg, "2", ids, x[::-1].copy(), scen, set(ids))
        publish(cfg, "3", ids, x, scen, set(ids))
        rollback(cfg)
        r4 = publish(cfg, "4", ids, x, scen, set(ids))  # drops v2 while searches run
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors[:3]
    assert min(counts) > 0
    assert current_version(cfg) == "4" and "redrec_items_v2" in r4.dropped


def test_search_that_resolved_a_just_dropped_version_retries_on_the_new_one(cfg, monkeypatch):
    """The race a swap opens: a search resolves the alias to the served version, a publication
    swaps and its retention drops that version, then the search runs: it must re-resolve."""
    search_mod = importlib.import_module("redrec.index.search")  # the package re-exports a function of that name

    cfg = cfg.model_copy(update={"keep_versions": 2})
    ids, x, scen = world(1200, 6)
    publish(cfg, "1", ids, x, scen, set(ids))
    publish(cfg, "2", ids, x, scen, set(ids))
    rollback(cfg)  # serves v1, the oldest: the next publication drops it right after its swap
    q = x[:2]
    before = search(cfg, q, "homefeed", 5)
    r = publish(cfg, "3", ids, x, scen, set(ids))
    assert r.dropped == ["redrec_items_v1"]
    real = search_mod._alias_target
    calls = []

    def stale_once(c):  # the first resolution happened before the swap
        calls.append(1)
        return "redrec_items_v1" if len(calls) == 1 else real(c)

    monkeypatch.setattr(search_mod, "_alias_target", stale_once)
    got = search(cfg, q, "homefeed", 5)  # v3 holds the same vectors as v1: same answer
    assert [g[0] for g in got] == [b[0] for b in before] and len(calls) == 2
    np.testing.assert_allclose([g[1] for g in got], [b[1] for b in before], atol=1e-5)
    # an error while the alias stays put is not retried away
    calls.clear()
    monkeypatch.setattr(search_mod, "_alias_target", lambda c: "redrec_items_v1")
    with pytest.raises(Exception, match="redrec_items_v1"):
        search(cfg, q, "homefeed", 5)
    assert len(calls) == 0


def test_exact_topk_blocks_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 8)).astype(np.float32)
    q = rng.standard_normal((5, 8)).astype(np.float32)
    cfg = IndexConfig(uri="unused.db", dim=8, metric="IP")
    i, s = exact_topk(cfg, q, x, 7, block=128)
    want = np.argsort(-(q @ x.T), axis=1)[:, :7]
    np.testing.assert_array_equal(i, want)


def test_lite_server_shares_one_file_between_processes(tmp_path):
    db = tmp_path / "shared.db"
    ids, x, scen = world(600, 5)
    with LiteServer(db) as uri:
        assert uri.startswith("http://127.0.0.1:")
        cfg = IndexConfig(uri=uri, dim=DIM, verify_sample=20)
        try:
            publish(cfg, "7", ids, x, scen, set(ids))
            mine = search(cfg, x[:2], "search", 5)
            code = (
                "import json,sys,numpy as np\n"
                "from redrec.index import IndexConfig, search, current_version\n"
                f"cfg = IndexConfig(uri={uri!r}, dim={DIM})\n"
                "q = np.asarray(json.loads(sys.stdin.read()), dtype=np.float32)\n"
                "print(json.dumps([current_version(cfg), search(cfg, q, 'search', 5)]))\n"
            )
            out = subprocess.run([sys.executable, "-c", code], input=json.dumps(x[:2].tolist()), capture_output=True,
                                 text=True, timeout=120, check=True)
            version, theirs = json.loads(out.stdout.strip().splitlines()[-1])
            assert version == "7"
            assert [t[0] for t in theirs] == [m[0] for m in mine]
        finally:
            close_clients(uri)
    # the server released the file: this process can open it directly now
    cfg = IndexConfig(uri=str(db), dim=DIM)
    try:
        assert current_version(cfg) == "7"
    finally:
        close_clients(cfg.uri)


def test_cli_publish_status_rollback_and_refusal(tmp_path, capsys, monkeypatch):
    """`redrec index ...` on a checkpoint's item_ids.json + item_embeddings.npy and a catalogue
    parquet; the milvus section of the chart's config.yaml says where."""
    import pandas as pd

    from redrec.cli import main

    ids, x, scen = world(900, 7)
    cat = tmp_path / "items.parquet"
    pd.DataFrame({"item_id": ids, "scenarios": scen}).to_parquet(cat)
    conf = tmp_path / "config.yaml"
    conf.write_text(f"milvus:\n  uri: {tmp_path / 'm.db'}\n  collection_alias: cli_items\n")
    monkeypatch.setenv("REDREC_CONFIG", str(conf))
    for v, vec in (("1", x), ("2", x[::-1].copy())):
        ck = tmp_path / f"ckpt{v}"
        ck.mkdir()
        (ck / "item_ids.json").write_text(json.dumps(ids))
        np.save(ck / "item_embeddings.npy", vec)
        assert main(["index", "publish", "--checkpoint", str(ck), "--version", v, "--items", str(cat)]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["collection"] == f"cli_items_v{v}" and out["recall"] >= 0.95
    assert main(["index", "status"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["serves"] == "cli_items_v2" and [v["version"] for v in st["versions"]] == ["1", "2"]
    assert main(["index", "rollback"]) == 0
    assert json.loads(capsys.readouterr().out) == {"from": "2", "to": "1"}
    # an item of the model missing from the catalogue: refused, named, exit code 2, alias unmoved
    pd.DataFrame({"item_id": ids[1:], "scenarios": scen[1:]}).to_parquet(cat)
    assert main(["index", "publish", "--checkpoint", str(tmp_path / "ckpt2"), "--version", "3", "--items", str(cat)]) == 2
    assert "1 item(s) missing from the catalogue: 'it00000'" in capsys.readouterr().err
    assert main(["index", "status"]) == 0
    assert json.loads(capsys.readouterr().out)["serves"] == "cli_items_v1"
    assert main(["index", "status", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err
