"""Items the model never trained on: the text-plus-residual representation, its checkpoint, and the
checks a file of new items passes before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from redrec.items.validate import ItemLimits, ItemsRefused, check_items, load_new_items
from redrec.model.checkpoint import PROBE_ITEMS, export_checkpoint, load_for_serving
from redrec.model.recommender import ModelConfig, RecModel

SCEN = ["homefeed", "search"]


def residual_model(n_items=20, text_dim=12, dropout=0.2, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig.model_validate({
        "item_source": "cache-residual", "residual_dropout": dropout, "scenarios": SCEN, "actions": ["click"],
        "n_items": n_items, "dim": 8, "user_tower": {"hidden_size": 16, "layers": 1, "heads": 2, "max_len": 10}})
    cache = np.random.default_rng(seed).normal(size=(n_items, text_dim)).astype(np.float32)
    model = RecModel(cfg, item_cache=cache)
    with torch.no_grad():  # a trained model: some items learned a residual, others (item 5 on) none
        model.item_residual.weight[1:5] = torch.randn(4, model.cfg.user_tower.hidden_size)
    return model, cache


def test_an_unseen_item_is_its_text_path_and_a_warm_item_differs_by_its_residual(tmp_path):
    model, cache = residual_model()
    model.eval()
    with torch.no_grad():
        reps = model.item_reps(torch.arange(1, 21))
        text = model.text_reps(torch.from_numpy(cache))
    assert torch.allclose(reps[4:], text[4:])  # zero residual: exactly the text path
    assert not torch.allclose(reps[:4], text[:4], atol=1e-3)
    with torch.no_grad():
        shifted = model.text_reps(torch.from_numpy(cache[:4])) + model.item_residual.weight[1:5]
    assert torch.allclose(reps[:4], shifted, atol=1e-6)

    # training drops residuals per occurrence: with dropout 1 every item is its text path
    model.cfg.residual_dropout = 1.0
    model.train()
    with torch.no_grad():
        assert torch.allclose(model.item_reps(torch.arange(1, 21)), text)
    model.cfg.residual_dropout = 0.5
    with torch.no_grad():
        dropped = (model.item_reps(torch.arange(1, 5).repeat(50)) - text[:4].repeat(50, 1)).abs().sum(-1) < 1e-6
    assert 0.2 < dropped.float().mean() < 0.8

    # the serving checkpoint round-trips both: warm items' reps, and the text path for new items
    model.cfg.residual_dropout = 0.2
    model.eval()
    ids = [f"i{j}" for j in range(20)]
    served, info = load_for_serving(export_checkpoint(model, tmp_path / "ck", ids))
    assert torch.allclose(served.item_reps_table[1:], reps, atol=1e-6)
    new_text = np.random.default_rng(9).normal(size=(3, 12)).astype(np.float32)
    with torch.no_grad():
        assert torch.allclose(served.text_reps(new_text), model.text_reps(torch.from_numpy(new_text)), atol=1e-6)
    unit = cache[:PROBE_ITEMS] / np.linalg.norm(cache[:PROBE_ITEMS], axis=1, keepdims=True)
    assert np.allclose(served.text_probe, unit, atol=1e-6) and info["item_text"]["probe_items"] == ids[:PROBE_ITEMS]
    # appended items get the next indices and their rows
    got = served.append_items(served.text_reps(new_text))
    assert list(got) == [21, 22, 23]
    assert torch.allclose(served.item_reps(torch.tensor([22])), served.text_reps(new_text[1:2]))


def test_a_model_without_a_text_path_says_so():
    cfg = ModelConfig.model_validate({"item_source": "id", "scenarios": SCEN, "actions": ["click"], "n_items": 5,
                                      "user_tower": {"hidden_size": 16, "layers": 1, "heads": 2, "max_len": 10}})
    with pytest.raises(ValueError, match="no text path"):
        RecModel(cfg).text_reps(torch.zeros(1, 16))


def good(**over):
    row = {"_row": 1, "item_id": "new-1", "title": "A film", "body": "about things", "tags": ["Drama"], "scenarios": ["search"]}
    return {**row, **over}


def refused(rows, known=None, limits=ItemLimits()):
    with pytest.raises(ItemsRefused) as e:
        check_items(rows, SCEN, known, limits)
    return str(e.value)


def test_bad_items_are_refused_naming_row_and_field():
    assert "row 1: field 'scenarios' names unknown scenario(s) ['ads']" in refused([good(scenarios=["ads"])])
    assert "row 1: field 'scenarios' is empty" in refused([good(scenarios=[])])
    assert "row 2: field 'item_id' 'new-1' duplicates row 1" in refused([good(), good(_row=2)])
    assert "row 1: field 'item_id' 'old' is already in the catalogue" in refused([good(item_id="old")], known={"old"})
    assert "row 1: field 'title' is empty" in refused([good(title="   ")])
    assert "row 1: field 'title' has 1,048,576 characters, more than 1,000" in refused([good(title="x" * (1 << 20))])
    assert "row 1: field 'item_id' is missing or empty" in refused([good(item_id="")])
    assert "field 'tags' must be a list of strings" in refused([good(tags=[1, 2])])
    assert "unknown field(s) ['colour']" in refused([good(colour="red")])
    assert "row 1: field 'title' is not UTF-8" in refused([good(title=b"\xff\xfe")])
    # every problem of the file at once, not the first one only
    many = refused([good(scenarios=["ads"]), good(_row=2, item_id="new-2", title="")])
    assert "row 1:" in many and "row 2:" in many and "2 problem(s)" in many
    df = check_items([good(tags="Drama, Comedy", scenarios="search,homefeed")], SCEN)
    assert df.iloc[0]["tags"] == ["Drama", "Comedy"] and df.iloc[0]["scenarios"] == ["search", "homefeed"]


def test_files_in_each_format_and_encoding_problems(tmp_path):
    rows = [{k: v for k, v in good(item_id=f"n{j}").items() if k != "_row"} for j in range(3)]
    p = tmp_path / "items.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert list(load_new_items(p, SCEN)["item_id"]) == ["n0", "n1", "n2"]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(p.read_bytes().replace(b"A film", b"A f\xffilm", 1))
    with pytest.raises(ItemsRefused, match=r"row 1: not UTF-8 \(byte 0xff"):
        load_new_items(bad, SCEN)
    csv = tmp_path / "items.csv"
    csv.write_bytes(b"item_id,title,body,tags,scenarios\nc1,Title,,Drama,search\nc2,T\xe9l\xe9,,Drama,search\n")
    with pytest.raises(ItemsRefused, match="row 2: not UTF-8"):
        load_new_items(csv, SCEN)
    csv.write_text("item_id,title,body,tags,scenarios\nc1,Title,,Drama,search\n")
    assert load_new_items(csv, SCEN).iloc[0]["scenarios"] == ["search"]
    import pandas as pd

    pq = tmp_path / "items.parquet"
    pd.DataFrame(rows).to_parquet(pq)
    assert len(load_new_items(pq, SCEN)) == 3
    with pytest.raises(ItemsRefused, match="unknown file type '.txt'"):
        (tmp_path / "x.txt").write_text("")
        load_new_items(tmp_path / "x.txt", SCEN)
