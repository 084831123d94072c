"""Item-text poolings (slot / mean / last, a chosen layer), catalogue whitening and encode_items,
on the random-init tiny-llama decoder (no download)."""

import hashlib

import numpy as np
import pandas as pd
import pytest
import torch

from redrec.model.item_tower import (
    ItemTower, ItemTowerConfig, Whitening, catalogue_fingerprint, encode_items, item_cache_path, whitening_path,
)

TEXTS = ["short title", "a much longer title with many more words in it about space operas"]


def tower(pooling=None, layer=None, seed=0, **kw):
    torch.manual_seed(seed)  # same seed: same backbone weights whatever the pooling
    kw = {"hidden_size": 32, "layers": 2, "heads": 2, "max_text_tokens": 24, **kw}
    return ItemTower(ItemTowerConfig(backbone="tiny-llama", pooling=pooling, layer=layer, **kw)).eval()


def catalogue(n=40, offset=0):
    words = ["space", "opera", "pasta", "recipe", "crime", "drama", "comedy", "war", "love", "robot", "horse"]
    rng = np.random.default_rng(offset)
    rows = []
    for i in range(offset, offset + n):
        w = rng.choice(words, size=4).tolist()
        rows.append({"item_id": f"i{i}", "title": " ".join(w[:2]), "body": f"item {i} about {w[2]}", "tags": [w[3]]})
    return pd.DataFrame(rows)


@torch.no_grad()
def test_poolings_give_different_correctly_shaped_vectors_that_read_the_text_tokens():
    towers = {p: tower(p) for p in ("slot", "mean", "last")}
    tok = towers["mean"].tokenize(TEXTS)
    out = {p: t(tok["input_ids"], tok["attention_mask"]) for p, t in towers.items()}
    for p, v in out.items():
        assert v.shape == (2, 32) and torch.isfinite(v).all(), p
        assert not torch.allclose(v[0], v[1], atol=1e-3), p  # reads the text
    assert not torch.allclose(out["slot"], out["mean"], atol=1e-3)
    assert not torch.allclose(out["slot"], out["last"], atol=1e-3)
    assert not torch.allclose(out["mean"], out["last"], atol=1e-3)
    # what each pooling means, from the bare backbone over each text alone (no padding, no slot)
    bb = towers["mean"].backbone
    for i, text in enumerate(TEXTS):
        t = towers["mean"].tokenize([text])
        ids = t["input_ids"][:, t["attention_mask"][0].bool()]
        h = bb(input_ids=ids, output_hidden_states=True).hidden_states
        assert torch.allclose(out["mean"][i], h[-1][0].mean(0), atol=1e-5)
        assert torch.allclose(out["last"][i], h[-1][0, -1], atol=1e-5)
        mid = tower("mean", layer=1)(tok["input_ids"], tok["attention_mask"])
        assert torch.allclose(mid[i], h[1][0].mean(0), atol=1e-5)  # layer: that hidden layer's states
    assert not torch.allclose(mid, out["mean"], atol=1e-3)
    # one pass of a slot tower yields every variant, equal to the dedicated towers' outputs
    items = pd.DataFrame({"item_id": ["a", "b"], "title": TEXTS, "body": ["", ""], "tags": [[], []]})
    variants = towers["slot"].encode_variants(items, [("slot", None), ("mean", None), ("last", None), ("mean", 1)])
    for (p, layer), v in variants.items():
        ref = tower(p, layer).encode_catalogue(items)
        assert v.shape == (2, 32) and np.allclose(v, ref, atol=1e-5), (p, layer)


@pytest.mark.parametrize("pooling", ["mean", "last"])
@torch.no_grad()
def test_mean_and_last_ignore_padding(pooling):
    t = tower(pooling)
    tok = t.tokenize(TEXTS)  # padded to max_text_tokens
    ids, mask = tok["input_ids"], tok["attention_mask"]
    assert (mask[0] == 0).sum() > 10  # the short text really is padded
    solo = t.tokenize([TEXTS[0]])
    keep = solo["attention_mask"][0].bool()
    alone = t(solo["input_ids"][:, keep], solo["attention_mask"][:, keep])
    pad = t.tokenizer.pad_token_id
    extra = (torch.cat([torch.full((2, 30), pad), ids], 1), torch.cat([torch.zeros(2, 30, dtype=mask.dtype), mask], 1))
    padded, more = t(ids, mask), t(*extra)
    assert torch.allclose(padded[0], alone[0], atol=1e-5)
    assert torch.allclose(more[0], alone[0], atol=1e-5) and torch.allclose(more[1], padded[1], atol=1e-5)


def test_whitening_is_fitted_once_on_the_catalogue_and_reused_for_new_items(tmp_path):
    cfg = ItemTowerConfig(backbone="tiny-llama", hidden_size=16, layers=1, heads=2, max_text_tokens=24, pooling="mean", whiten=True)
    cat = catalogue(60)
    vecs = encode_items(cfg, cat, tmp_path)
    assert vecs.shape == (60, 16)
    assert np.allclose(vecs.mean(0), 0, atol=1e-4) and np.allclose(np.cov(vecs, rowvar=False, bias=True), np.eye(16), atol=1e-3)
    wpath = whitening_path(cat, cfg, tmp_path)
    raw_path = item_cache_path(cat, cfg.model_copy(update={"whiten": False}), tmp_path)
    assert wpath.exists() and raw_path.exists()
    stored = wpath.read_bytes()
    # the stored transform on the cached raw rows is exactly the catalogue's output
    w = Whitening.load(wpath)
    assert np.array_equal(w.apply(np.load(raw_path)), vecs)
    # new items (two unseen, one from the catalogue) with the catalogue's transform
    new = pd.concat([catalogue(2, offset=1000), cat.iloc[[7]]], ignore_index=True)
    got = encode_items(cfg, new, tmp_path, catalogue=cat)
    assert np.allclose(got[2], vecs[7], atol=1e-4)
    raw_new = encode_items(cfg.model_copy(update={"whiten": False}), new, tmp_path)
    assert np.array_equal(got, w.apply(raw_new))
    assert wpath.read_bytes() == stored  # not refitted on the new items
    # without the catalogue the new frame would be whitened on its own: a different function
    assert not np.allclose(encode_items(cfg.model_copy(update={"whiten_dims": 2}), new, tmp_path)[:, :2], got[:, :2], atol=1e-3)
    # whiten_dims keeps the leading principal directions of the same fit
    short = encode_items(cfg.model_copy(update={"whiten_dims": 4}), cat, tmp_path)
    assert short.shape == (60, 4) and np.allclose(short, vecs[:, :4], atol=1e-4)


@pytest.mark.parametrize("pooling", ["slot", "mean"])
def test_encode_items_of_a_subset_equals_the_catalogue_rows(tmp_path, pooling):
    cfg = ItemTowerConfig(backbone="tiny-llama", hidden_size=16, layers=1, heads=2, max_text_tokens=24, pooling=pooling)
    cat = catalogue(30)
    full = encode_items(cfg, cat, tmp_path)
    assert item_cache_path(cat, cfg, tmp_path).exists()
    sub = cat.iloc[[3, 17, 29]].reset_index(drop=True)
    part = encode_items(cfg, sub, tmp_path, catalogue=cat)
    assert np.allclose(part, full[[3, 17, 29]], atol=1e-5)
    assert not item_cache_path(sub, cfg, tmp_path).exists()  # new items are not cached one frame at a time
    assert not np.allclose(encode_items(cfg, sub, tmp_path, seed=1), part, atol=1e-3)  # the seed is honoured


def test_fingerprint_keeps_old_keys_and_separates_new_variants():
    cat = catalogue(5)
    for backbone in ("minilm", "tiny-llama", "smollm2"):
        cfg = ItemTowerConfig(backbone=backbone)
        legacy = cfg.model_dump_json(exclude={"pooling", "layer", "whiten", "whiten_dims"})  # the key before these fields
        h = hashlib.sha256(legacy.encode())
        for row in zip(cat["item_id"], cat["title"], cat["body"], cat["tags"]):
            h.update(repr(row).encode())
        assert catalogue_fingerprint(cat, cfg) == h.hexdigest()[:16], backbone
    base = ItemTowerConfig(backbone="tiny-llama")
    keys = {catalogue_fingerprint(cat, base.model_copy(update=u)) for u in
            ({}, {"pooling": "mean"}, {"pooling": "last"}, {"layer": 1}, {"whiten": True}, {"whiten": True, "whiten_dims": 3})}
    assert len(keys) == 6
    assert catalogue_fingerprint(cat, base.model_copy(update={"pooling": "slot"})) == catalogue_fingerprint(cat, base)


def test_minilm_is_mean_pooled_only():
    with pytest.raises(ValueError, match="mean"):
        ItemTowerConfig(backbone="minilm", pooling="slot")
    assert ItemTowerConfig(backbone="minilm", pooling="mean").resolved_pooling == "mean"
