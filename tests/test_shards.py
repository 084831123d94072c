"""The training set read as shards: each rank its own users, streamed; the same training as in memory.

One real Feast training set (200 synthetic users) is written in several layouts: the pandas
path's single file in row groups, sorted part files (the Spark path's range-partitioned write)
and hash-partitioned part files; bad layouts are made from it by damaging a copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from redrec.data import chronological_split, encode
from redrec.data.synthetic import SyntheticConfig, generate
from redrec.pipeline.training_data import from_training_set, validation_users
from redrec.train.shards import (
    MANIFEST,
    TrainingSetError,
    TrainingSetShards,
    write_training_set,
    write_training_set_manifest,
)
from redrec.train.stream import ShardedTrainSource, StreamConfig

ROOT = Path(__file__).resolve().parents[1]
N_USERS = 200
SEQ_LEN = 20
VALID_USERS = 150  # fewer than the users: validation is a sample, which both readers must draw alike


@pytest.fixture(scope="module")
def world_(tmp_path_factory):
    from redrec.features.store import FeatureRepo
    from redrec.pipeline.steps import label_rows

    data = generate(SyntheticConfig(n_users=N_USERS, seed=1))
    enc = encode(data)
    split = chronological_split(enc)
    base = tmp_path_factory.mktemp("shards")
    repo = FeatureRepo(base / "feast", seq_len=SEQ_LEN)
    repo.build_sources(data)
    repo.apply()
    table = pa.Table.from_pandas(repo.training_set(label_rows(enc, split)).df, preserve_index=False)
    return {"data": data, "enc": enc, "split": split, "table": table, "base": base}


def write_parts(table: pa.Table, d: Path, n_files: int, row_group_rows: int, hashed: bool = False) -> Path:
    """Part files of whole users: contiguous user ranges (sorted), or users dealt by hash."""
    d.mkdir(parents=True)
    table = table.sort_by("user_id")
    if hashed:
        owner = np.array([hash(u) % n_files for u in table.column("user_id").to_pylist()])  # unsorted parts
        parts = [table.filter(pa.array(owner == k)) for k in range(n_files)]
        parts = [p.take(np.random.default_rng(k).permutation(len(p))) for k, p in enumerate(parts)]
    else:
        bounds = np.linspace(0, len(table), n_files + 1).astype(int)
        parts = [table.slice(a, b - a) for a, b in zip(bounds, bounds[1:])]
    for k, p in enumerate(parts):
        pq.write_table(p, d / f"part-{k:05d}.parquet", row_group_size=row_group_rows)
    (d / "_SUCCESS").touch()  # what Spark leaves beside its parts: not a part
    return d


@pytest.fixture(scope="module")
def layouts(world_):
    base, table = world_["base"], world_["table"]
    single = write_training_set(table, base / "single", row_group_rows=30)
    sorted2 = write_parts(table, base / "sorted2", 2, row_group_rows=25)
    hashed3 = write_parts(table, base / "hashed3", 3, row_group_rows=1000, hashed=True)
    for d in (sorted2, hashed3):
        write_training_set_manifest(d)
    return {"single": single, "sorted2": sorted2, "hashed3": hashed3}


@pytest.fixture(scope="module")
def in_memory(world_, layouts):
    """Today's reader: the whole training set rebuilt into one RecData, encoded and split."""
    full = from_training_set(world_["data"], world_["enc"], world_["split"], layouts["single"])
    enc = encode(full.data)
    return full, enc, chronological_split(enc)


# ---- (a) shards ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout, world, by", [("single", 2, "row_groups"), ("sorted2", 2, "files"),
                                               ("sorted2", 3, "row_groups"), ("hashed3", 3, "files")])
def test_ranks_read_disjoint_shards_that_cover_every_user_once(world_, layouts, layout, world, by):
    path = layouts[layout]
    seen: list[str] = []
    for rank in range(world):
        sh = TrainingSetShards(path, rank, world)
        assert sh.by == by
        mine = [u for rb in sh.iter_users(16, columns=["user_id"]) for u in rb.column("user_id").to_pylist()]
        assert len(mine) == sh.rows == sh.rows_per_rank()[rank]  # the plan's row counts are what is read
        seen += mine
    assert len(seen) == N_USERS and sorted(seen) == sorted(world_["enc"].user_ids)  # disjoint and covering
    per_rank = TrainingSetShards(path, 0, world).rows_per_rank()
    biggest = max(u.rows for u in TrainingSetShards(path, 0, world).all_units)
    assert max(per_rank) - min(per_rank) <= biggest  # balanced to within one unit


def test_empty_part_files_are_no_rank_s_shard(world_, tmp_path):
    d = write_parts(world_["table"], tmp_path / "parts", 2, row_group_rows=25)
    pq.write_table(world_["table"].slice(0, 0), d / "part-00002.parquet")  # an empty partition's file
    write_training_set_manifest(d)
    for rank in range(2):
        sh = TrainingSetShards(d, rank, 2)
        assert sh.by == "files" and sh.rows == 100 and "part-00002.parquet" not in {u.file.name for u in sh.units}
    assert TrainingSetShards(d, 0, 3).by == "row_groups"  # two non-empty files for three ranks


def test_every_rank_yields_the_same_number_of_full_batches(world_, layouts):
    src = ShardedTrainSource(layouts["sorted2"], world_["enc"], StreamConfig(batch_rows=16, buffer_chunks=2))
    rows = src.shards(0, 3).rows_per_rank()
    assert len(set(rows)) > 1  # unequal shards: the larger ones stop early, none runs short
    n = src.n_batches(16, 3)
    assert n == min(rows) // 16
    for rank in range(3):
        sizes = [b["items"].shape[0] for b in src.train_batches(16, 0, seed=0, epoch=1, rank=rank, world=3, max_len=SEQ_LEN, window=10)]
        assert sizes == [16] * n, rank
    # a pure function of (seed, epoch, rank): a resumed run replays the same batches
    again = [src.train_batches(16, 0, seed=0, epoch=1, rank=1, world=3, max_len=SEQ_LEN, window=10) for _ in range(2)]
    assert all(all(np.array_equal(a[k], b[k]) for k in a) for a, b in zip(*again))


# ---- (b) the same training as the in-memory reader ------------------------------------------------------


@pytest.mark.parametrize("layout", ["single", "hashed3"])
def test_streamed_chunks_encode_each_user_like_the_in_memory_reader(world_, layouts, in_memory, layout):
    """Each user's history in a streamed chunk is exactly the in-memory encoding's training
    events (same items, scenarios, actions, times, order), so train_row makes the same examples."""
    _, enc, split = in_memory
    src = ShardedTrainSource(layouts[layout], enc, StreamConfig(batch_rows=16))
    where = {u: i for i, u in enumerate(enc.user_ids)}
    users = 0
    for rank in range(2):
        for chunk in src.chunks(rank, 2):
            for u, uid in enumerate(chunk.user_ids):
                v = where[uid]
                mem, got = slice(enc.offsets[v], split.train_end[v]), chunk.user_slice(u)
                for f in ("item", "scenario", "action", "ts"):
                    assert np.array_equal(getattr(enc, f)[mem], getattr(chunk, f)[got]), (uid, f)
                users += 1
    assert users == N_USERS
    # the logQ frequencies: each rank counts its shard, the ranks' sum is the in-memory count
    mem_counts = np.bincount(np.concatenate([enc.item[enc.offsets[u] : split.train_end[u]] for u in range(enc.n_users)]),
                             minlength=enc.n_items + 1)
    assert np.array_equal(src.item_counts(0, 2) + src.item_counts(1, 2), mem_counts)


def _trainer(world_, out, *, streamed: Path | None, in_memory=None, max_steps=400, eval_every=50):
    from redrec.experiment import ExperimentConfig, build_model_config
    from redrec.train.trainer import Trainer

    cfg = ExperimentConfig.model_validate({
        "dataset": "synthetic",
        "model": {"item_source": "id", "user_tower": {"hidden_size": 32, "layers": 1, "heads": 2, "max_len": SEQ_LEN}},
        "train": {"max_steps": max_steps, "eval_every": eval_every, "batch_size": 16, "negatives": 64, "progress": False,
                  "warmup_steps": 2, "seed": 0, "valid_max_users": VALID_USERS}, "out_dir": str(out)})
    if streamed is None:
        full, enc, split = in_memory
        data, source = full.data, None
    else:
        # only the validation sample is rebuilt in memory; training reads the shards
        val = from_training_set(world_["data"], world_["enc"], world_["split"], streamed,
                                users=validation_users(world_["enc"], VALID_USERS))
        data, enc = val.data, encode(val.data)
        split = chronological_split(enc)
        source = ShardedTrainSource(streamed, enc, StreamConfig(batch_rows=32, buffer_chunks=2))
    mcfg = build_model_config(cfg.model, "redrec", data, enc.n_items)
    return Trainer(mcfg, cfg.train, enc, split, out, log=lambda *_: None, train_source=source)


def test_streamed_training_follows_the_in_memory_validation_curve(world_, layouts, in_memory, tmp_path):
    """Same data, same seed, same steps; the readers order and sample the examples differently,
    so the weights differ and the curves agree within noise. Tolerance: 0.02 NDCG@10, the spread
    of the in-memory reader's own best validation over seeds 0-2 here (0.095-0.111 at 400 steps;
    the streamed reader was within 0.005 of it at each seed). A reader that mis-encodes items or
    histories stays near popularity (0.065), far outside it."""
    from redrec.evaluate import evaluate_popularity

    _, enc, split = in_memory
    pop = evaluate_popularity(enc, split, on="valid").overall["ndcg@10"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: on 2 shared cores, 2 intra-op threads made these runs 7x slower
    try:
        mem = _trainer(world_, tmp_path / "mem", streamed=None, in_memory=in_memory)
        fit_mem = mem.fit(resume=False)
        stream = _trainer(world_, tmp_path / "stream", streamed=layouts["sorted2"])
        fit_stream = stream.fit(resume=False)
    finally:
        torch.set_num_threads(threads)
    assert fit_mem["steps"] == fit_stream["steps"] == 400
    assert len(fit_mem["history"]) == len(fit_stream["history"]) == 8
    best_mem, best_stream = fit_mem["best_valid"], fit_stream["best_valid"]
    assert best_mem > 1.25 * pop and best_stream > 1.25 * pop, (pop, best_mem, best_stream)
    assert abs(best_mem - best_stream) <= 0.02, (best_mem, best_stream)
    # a sample of the users on both: neither records its validation as the full one
    assert mem.best_valid_result is None and stream.best_valid_result is None
    # both validate on the same users with the same histories and labels: the same weights score the same
    stream.engine.module.load_state_dict(mem.engine.module.state_dict())
    assert stream.validate() == mem.validate()
    # the logQ frequencies the streamed trainer gathered are the in-memory trainer's
    assert np.array_equal(stream.item_prob.cpu().numpy(), mem.item_prob.cpu().numpy())


WORKER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from test_shards import _trainer, VALID_USERS, N_USERS
    from redrec.data import chronological_split, encode
    from redrec.data.synthetic import SyntheticConfig, generate
    data = generate(SyntheticConfig(n_users=N_USERS, seed=1))
    enc = encode(data)
    world_ = {"data": data, "enc": enc, "split": chronological_split(enc)}
    out = Path(sys.argv[2])
    tr = _trainer(world_, out / "run", streamed=Path(sys.argv[1]), max_steps=6, eval_every=3)
    fit = tr.fit(resume=False)
    (out / f"rank{tr.rank}.json").write_text(json.dumps({
        "rank": tr.rank, "world": tr.world, "steps": fit["steps"], "n_batches": tr.n_batches,
        "item_prob": tr.item_prob.cpu().numpy().tolist(), "best": fit["best_valid"]}))
    import os; os._exit(0)  # see tests/gather_worker.py: the interpreter's teardown may abort after gloo
""")


def test_two_torchrun_ranks_train_in_step_from_their_own_shards(world_, layouts, in_memory, tmp_path):
    """Real ranks: each streams its shard; the per-rank item counts are summed over the ranks;
    both run the same number of batches, so their collectives stay in step to the end."""
    (tmp_path / "worker.py").write_text(WORKER)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    out = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(tmp_path / "worker.py"), str(layouts["sorted2"]),
         str(tmp_path), str(ROOT / "tests")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    _, enc, split = in_memory
    counts = np.bincount(np.concatenate([enc.item[enc.offsets[u] : split.train_end[u]] for u in range(enc.n_users)]),
                         minlength=enc.n_items + 1).astype(np.float32)
    for r, res in enumerate(ranks):
        assert (res["rank"], res["world"], res["steps"]) == (r, 2, 6)
        assert res["n_batches"] == ShardedTrainSource(layouts["sorted2"], enc).n_batches(16, 2)
        assert np.allclose(res["item_prob"], counts / counts.sum())  # not just this rank's shard
    assert ranks[0]["best"] == ranks[1]["best"]  # the same validation on both ranks


# ---- (c) bad input: errors naming the file ------------------------------------------------------------


def _copy(layouts, name, tmp_path) -> Path:
    d = tmp_path / name
    shutil.copytree(layouts[name], d)
    return d


def test_a_listed_part_that_is_missing_is_named(layouts, tmp_path):
    d = _copy(layouts, "sorted2", tmp_path)
    (d / "part-00001.parquet").unlink()
    with pytest.raises(TrainingSetError, match=r"part-00001\.parquet: listed in _manifest\.json but missing"):
        TrainingSetShards(d, 0, 2)
    # without a manifest, a directory of parts cannot show a part is missing: refused, not guessed
    (d / MANIFEST).unlink()
    shutil.copy(layouts["sorted2"] / "part-00001.parquet", d)
    with pytest.raises(TrainingSetError, match=r"2 part files but no _manifest\.json.*write_training_set_manifest"):
        TrainingSetShards(d, 0, 2)


def test_a_part_not_in_the_manifest_or_changed_after_it_is_named(layouts, tmp_path):
    d = _copy(layouts, "sorted2", tmp_path)
    shutil.copy(d / "part-00001.parquet", d / "part-00002.parquet")
    with pytest.raises(TrainingSetError, match=r"part-00002\.parquet: a part file not listed"):
        TrainingSetShards(d, 0, 2)
    (d / "part-00002.parquet").unlink()
    t = pq.read_table(d / "part-00001.parquet")
    pq.write_table(t.slice(1), d / "part-00001.parquet")
    with pytest.raises(TrainingSetError, match=r"part-00001\.parquet: 99 rows .* lists 100 rows"):
        TrainingSetShards(d, 0, 2)


@pytest.mark.parametrize("drift", ["missing", "type"])
def test_schema_drift_in_one_part_is_named(world_, tmp_path, drift):
    d = write_parts(world_["table"], tmp_path / "parts", 3, row_group_rows=50)
    p = d / "part-00001.parquet"
    t = pq.read_table(p)
    col = "seq_search__timestamps"
    if drift == "missing":
        t = t.drop_columns([col])
    else:
        t = t.set_column(t.schema.get_field_index(col), col, pc.cast(t.column(col), pa.list_(pa.int32())))
    pq.write_table(t, p)
    what = "missing column" if drift == "missing" else r"seq_search__timestamps is list<element: int32>, not list<element: int64>"
    with pytest.raises(TrainingSetError, match=rf"part-00001\.parquet: schema differs .*{what}"):
        write_training_set_manifest(d)
    # a manifest written before the drift: still named when planning
    (tmp_path / "ok").mkdir()
    d2 = write_parts(world_["table"], tmp_path / "ok" / "parts", 3, row_group_rows=50)
    write_training_set_manifest(d2)
    m = json.loads((d2 / MANIFEST).read_text())
    pq.write_table(t, d2 / "part-00001.parquet")
    m["files"][1].update(rows=t.num_rows, bytes=(d2 / "part-00001.parquet").stat().st_size)  # a writer that listed it so
    (d2 / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(TrainingSetError, match=rf"part-00001\.parquet: schema differs .*{what}"):
        TrainingSetShards(d2, 0, 2)


def test_a_user_split_across_two_parts_is_named(world_, tmp_path):
    d = write_parts(world_["table"], tmp_path / "parts", 2, row_group_rows=25)
    a, b = d / "part-00000.parquet", d / "part-00001.parquet"
    ta, tb = pq.read_table(a), pq.read_table(b)
    user = ta.column("user_id")[50].as_py()
    # part 1 also holds one of part 0's users (still sorted: it sorts before part 1's own)
    pq.write_table(pa.concat_tables([ta.slice(50, 1), tb]), b, row_group_size=25)
    with pytest.raises(TrainingSetError, match=rf"part-00000\.parquet and .*part-00001\.parquet: user '{user}' is in more than one row \(split across part files\)"):
        write_training_set_manifest(d)
    # a writer that listed the parts without checking: the plan sees the overlapping user ranges
    m = {"format": "redrec-training-set/1", "rows": 201, "users_check": "sorted",
         "files": [{"name": p.name, "rows": pq.read_metadata(p).num_rows, "bytes": p.stat().st_size} for p in (a, b)]}
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(TrainingSetError, match=r"part-00000\.parquet and part-00001\.parquet: user ranges .* overlap"):
        TrainingSetShards(d, 0, 2)
    # hash-partitioned parts (unsorted): the manifest writer's exact check names both files too
    h = write_parts(world_["table"], tmp_path / "hashed", 3, row_group_rows=1000, hashed=True)
    h0 = pq.read_table(h / "part-00000.parquet")
    h2 = h / "part-00002.parquet"
    pq.write_table(pa.concat_tables([pq.read_table(h2), h0.slice(3, 1)]), h2)
    with pytest.raises(TrainingSetError, match=rf"part-00000\.parquet and .*part-00002\.parquet: user '{h0.column('user_id')[3].as_py()}'"):
        write_training_set_manifest(h)


def test_a_user_twice_in_one_file_is_named_while_streaming(world_, tmp_path):
    t = world_["table"].sort_by("user_id")
    d = tmp_path / "dup"
    d.mkdir()
    dup = pa.concat_tables([t.slice(0, 11), t.slice(10)])  # the 11th user twice, adjacent: no footer shows it
    pq.write_table(dup, d / "training_set.parquet", row_group_size=60)
    sh = TrainingSetShards(d, 0, 1)
    with pytest.raises(TrainingSetError, match=rf"training_set\.parquet: user '{t.column('user_id')[10].as_py()}' appears twice"):
        list(sh.iter_users(8))


def test_items_outside_the_catalogue_are_named(world_, layouts, tmp_path):
    import dataclasses

    enc = world_["enc"]
    fewer = dataclasses.replace(enc, item_ids=enc.item_ids[:-50])
    src = ShardedTrainSource(layouts["single"], fewer)
    with pytest.raises(TrainingSetError, match=r"training_set\.parquet.*item ids not in the catalogue .*different runs"):
        next(src.train_batches(16, 0, 0, 0, max_len=SEQ_LEN, window=10))
