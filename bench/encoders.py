"""Which encoder's reading of item text is a useful item vector? Frozen encoders, no recommender
training: each variant's cached catalogue vectors are scored by content kNN on MovieLens-1M.

Variants: all-MiniLM-L6-v2 (mean pooling, the default item encoder) and SmolLM2-135M-Instruct read
with pooling slot (the [ITEM] slot, random and untrained when frozen) / mean / last, at the last
layer and at the middle layer that scores best on VALIDATION, each raw and PCA-whitened (fitted on
the catalogue). All SmolLM2 readings come from ONE forward pass (every hidden layer kept); the
per-variant vectors are cached under $REDREC_CACHE by catalogue fingerprint, so a rerun reads them.

Metrics, per variant:
- standard leave-one-out (scenarios collapsed, train to n-2 / valid n-1 / test n), full ranking
  of the whole catalogue, history masked: a user's score for an item is the cosine between the
  mean of the L2-normalised vectors of the user's last 50 history items and the item's vector;
- genre agreement: share of each item's 10 nearest catalogue neighbours (cosine) that share a
  genre with it (the genres are also in the text, so this checks the reading, not taste).

    python bench/encoders.py                  # encode what is not cached, evaluate, write JSON
    python bench/encoders.py --no-head        # skip the contrastive-head adaptation
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("REDREC_CACHE", str(ROOT / "build" / "cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from redrec.model.item_tower import (  # noqa: E402
    ItemTower, ItemTowerConfig, Whitening, encode_items, item_cache_path,
)

OUT = ROOT / "bench" / "results" / "encoders.json"
SMOLLM2_LAYERS = [3, 6, 9, 12, 15, 18, 21, 24, 27, None]  # None: the last layer (30, final norm)
POOLINGS = ["slot", "mean", "last"]


def machine() -> dict:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def smollm2_cfg(pooling: str, layer: int | None, whiten: bool = False) -> ItemTowerConfig:
    return ItemTowerConfig(backbone="smollm2", pooling=pooling, layer=layer, whiten=whiten)


def timing_path(cache: Path) -> Path:
    return cache / "encoders-timing.json"


def ensure_smollm2_cache(items, cache: Path, log=print) -> dict:
    """One SmolLM2 forward pass over the catalogue collecting every (pooling, layer) variant, each
    cached where encode_items/cached_item_reps look; returns the pass's timing (kept for reruns)."""
    variants = [(p, l) for p in POOLINGS for l in SMOLLM2_LAYERS]
    missing = [v for v in variants if not item_cache_path(items, smollm2_cfg(*v), cache).exists()]
    timings = json.loads(timing_path(cache).read_text()) if timing_path(cache).exists() else {}
    if not missing:
        return timings.get("smollm2", {})
    log(f"SmolLM2: one forward pass over {len(items)} items for {len(variants)} variants ...")
    torch.manual_seed(0)  # what encode_items(seed=0) does before building the tower: same [ITEM] slot
    tower = ItemTower(smollm2_cfg("slot", None), cache_root=cache)
    t0 = time.perf_counter()
    out = tower.encode_variants(items, variants)
    wall = time.perf_counter() - t0
    for v, reps in out.items():
        np.save(item_cache_path(items, smollm2_cfg(*v), cache), reps.astype(np.float32))
    timings["smollm2"] = {"wall_s": round(wall, 1), "items": len(items), "variants": len(variants),
                          "max_text_tokens": tower.cfg.max_text_tokens, "machine": machine()}
    timing_path(cache).write_text(json.dumps(timings, indent=1))
    log(f"SmolLM2 pass: {wall:.0f} s")
    return timings["smollm2"]


def minilm_timing(items, cache: Path, log=print) -> dict:
    timings = json.loads(timing_path(cache).read_text()) if timing_path(cache).exists() else {}
    if "minilm" not in timings:
        torch.manual_seed(0)
        tower = ItemTower(ItemTowerConfig(backbone="minilm"))
        t0 = time.perf_counter()
        reps = tower.encode_catalogue(items)
        wall = time.perf_counter() - t0
        cached = encode_items(ItemTowerConfig(backbone="minilm"), items, cache)
        timings["minilm"] = {"wall_s": round(wall, 1), "items": len(items), "max_abs_diff_vs_cache": float(np.abs(reps - cached).max()),
                             "machine": machine()}
        timing_path(cache).write_text(json.dumps(timings, indent=1))
        log(f"MiniLM pass: {wall:.0f} s")
    return timings["minilm"]


# ---- content kNN -------------------------------------------------------------------------------
def evaluate_content_knn(enc, split, item_vecs, on: str = "test", all_items: bool = False, last_n: int = 50):
    """The library's content kNN (``redrec.evaluate.evaluate_content_knn``) over vectors in
    catalogue row order ([n_items, d]) or with the padding row 0 ([n_items + 1, d])."""
    from redrec.evaluate import evaluate_content_knn as knn

    v = np.asarray(item_vecs)
    if v.shape[0] == enc.n_items:
        v = np.concatenate([np.zeros((1, v.shape[1]), v.dtype), v])
    return knn(enc, split, v, on=on, all_items=all_items, last_n=last_n)


def _item_table(enc, item_vecs) -> torch.Tensor:
    v = torch.as_tensor(np.asarray(item_vecs), dtype=torch.float64)
    if v.shape[0] == enc.n_items:
        v = torch.cat([torch.zeros(1, v.shape[1], dtype=v.dtype), v])
    if v.shape[0] != enc.n_items + 1:
        raise ValueError(f"item_vecs has {v.shape[0]} rows for {enc.n_items} items")
    return torch.nn.functional.normalize(v, dim=-1)  # the padding row stays zero


def _user_vectors(enc, v: torch.Tensor, tasks, last_n: int) -> torch.Tensor:
    idx = torch.zeros(len(tasks), last_n, dtype=torch.long)  # 0 = padding: a zero vector
    for b, t in enumerate(tasks):
        h = enc.item[max(int(enc.offsets[t.user]), t.history_end - last_n) : t.history_end]
        idx[b, : len(h)] = torch.as_tensor(h)
    return torch.nn.functional.normalize(v[idx].sum(1), dim=-1)  # direction of the mean


def _knn_rows(enc, split, item_vecs, tasks, last_n, eligible, candidates: np.ndarray | None = None, batch: int = 512):
    from redrec.evaluate import _rows

    v = _item_table(enc, item_vecs)
    rows = []
    for i in range(0, len(tasks), batch):
        chunk = tasks[i : i + batch]
        scores = _user_vectors(enc, v, chunk, last_n) @ v.T
        if candidates is not None:
            scores[:, ~torch.as_tensor(candidates)] = -torch.inf
        rows += _rows(scores, chunk, eligible)
    return rows


def cold_items(enc, frac: float = 0.2, seed: int = 0) -> np.ndarray:
    """A fixed random fifth of the catalogue, as a bool mask over item indices 0..n_items."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(enc.n_items + 1, dtype=bool)
    mask[1 + rng.choice(enc.n_items, size=int(frac * enc.n_items), replace=False)] = True
    return mask


def evaluate_new_items(enc, split, item_vecs, cold: np.ndarray, last_n: int = 50) -> dict:
    """"New items" shelf: users whose test item is one of the cold items; it is ranked among the
    cold items only (history masked). A head trained without the cold items meets them here first."""
    from redrec.evaluate import aggregate, eval_tasks

    tasks = [t for t in eval_tasks(enc, split, "test") if all(cold[x] for x in t.targets)]
    res = aggregate(_knn_rows(enc, split, item_vecs, tasks, last_n, None, candidates=cold), enc.scenarios)
    return {**res.overall, "users": res.counts["overall"], "candidates": int(cold.sum())}


def genre_agreement(vecs: np.ndarray, tags, k: int = 10) -> float:
    """Mean share of each item's k nearest neighbours (cosine, itself excluded) sharing a genre with it."""
    genres = sorted({g for ts in tags for g in ts})
    G = torch.zeros(len(tags), len(genres))
    pos = {g: j for j, g in enumerate(genres)}
    for i, ts in enumerate(tags):
        G[i, [pos[g] for g in ts]] = 1.0
    v = torch.nn.functional.normalize(torch.as_tensor(np.asarray(vecs), dtype=torch.float32), dim=-1)
    shares = []
    for i in range(0, len(v), 1024):
        s = v[i : i + 1024] @ v.T
        s[torch.arange(s.shape[0]), torch.arange(i, i + s.shape[0])] = -torch.inf
        nn_idx = s.topk(k, dim=1).indices  # [b, k]
        share = (G[i : i + s.shape[0], None, :] * G[nn_idx]).sum(-1) > 0
        shares.append(share.float().mean(1))
    return float(torch.cat(shares).mean())


def genre_chance(tags) -> float:
    """The same share for random neighbours: the fraction of item pairs sharing a genre."""
    genres = sorted({g for ts in tags for g in ts})
    G = torch.zeros(len(tags), len(genres))
    for i, ts in enumerate(tags):
        G[i, [genres.index(g) for g in ts]] = 1.0
    share = (G @ G.T > 0).float()
    n = len(tags)
    return float((share.sum() - share.diagonal().sum()) / (n * (n - 1)))


# ---- cheap adaptation: a contrastive head over frozen vectors -----------------------------------
def training_pairs(enc, split, cold: np.ndarray | None = None) -> np.ndarray:
    """(item, next item) pairs consumed consecutively by one user within the TRAINING part only
    (events before train_end: each user's last two events are never seen); pairs touching a cold
    item are dropped."""
    pairs = []
    for u in range(enc.n_users):
        seq = enc.item[int(enc.offsets[u]) : int(split.train_end[u])]
        if len(seq) > 1:
            pairs.append(np.stack([seq[:-1], seq[1:]], 1))
    p = np.concatenate(pairs)
    p = p[p[:, 0] != p[:, 1]]
    if cold is not None:
        p = p[~cold[p[:, 0]] & ~cold[p[:, 1]]]
    return p


def train_head(x: np.ndarray, pairs: np.ndarray, dim: int = 128, steps: int = 1000, batch: int = 512, lr: float = 1e-2,
               temperature: float = 0.05, seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """A linear head over frozen item vectors (catalogue rows, standardised inside), trained with
    symmetric in-batch InfoNCE on the pairs; returns every catalogue item through the head."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    xt = (xt - xt.mean(0)) / xt.std(0).clamp_min(1e-6)
    table = torch.cat([torch.zeros(1, xt.shape[1]), xt])  # item index i -> row i
    head = torch.nn.Linear(xt.shape[1], dim)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    pt = torch.as_tensor(pairs)
    losses = []
    for step in range(steps):
        b = pt[torch.randint(len(pt), (batch,), generator=g)]
        a = torch.nn.functional.normalize(head(table[b[:, 0]]), dim=-1)
        p = torch.nn.functional.normalize(head(table[b[:, 1]]), dim=-1)
        logits = a @ p.T / temperature
        # the same item twice in a batch is not a negative of itself
        same = b[:, 1][None, :] == b[:, 1][:, None]
        logits = logits.masked_fill(same & ~torch.eye(batch, dtype=torch.bool), -torch.inf)
        y = torch.arange(batch)
        loss = 0.5 * (torch.nn.functional.cross_entropy(logits, y) + torch.nn.functional.cross_entropy(logits.T, y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        return head(xt).numpy(), losses


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encode-only", action="store_true")
    ap.add_argument("--no-head", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from redrec.data.movielens import load_movielens_1m

    cache = Path(os.environ["REDREC_CACHE"])
    data = load_movielens_1m()
    ensure_smollm2_cache(data.items, cache)
    minilm_timing(data.items, cache)
    if args.encode_only:
        return
    result = evaluate_all(data, cache, head=not args.no_head)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(result))
    print(f"wrote {args.output}")


METRICS = ("ndcg@10", "hr@10", "mrr")


def evaluate_all(data, cache: Path, head: bool = True, log=print) -> dict:
    from redrec.data import encode, leave_one_out_split
    from redrec.evaluate import evaluate_popularity
    from redrec.experiment import collapse_scenarios

    t_start = time.perf_counter()
    enc = encode(collapse_scenarios(data))
    split = leave_one_out_split(enc)
    tags = list(data.items["tags"])
    cold = cold_items(enc)
    out = {"dataset": "movielens-1m", "items": enc.n_items, "users": enc.n_users,
           "protocol": "leave-one-out, scenarios collapsed, full ranking of the whole catalogue, history masked; "
                       "content kNN: cosine(mean of the L2-normalised vectors of the last 50 history items, item)",
           "genre_agreement": "share of each item's 10 nearest neighbours (cosine) sharing a genre with it",
           "new_items": "users whose test item is in a fixed random fifth of the catalogue (cold); ranked among the cold items only; "
                        "the contrastive heads never train on a pair touching a cold item",
           "machine": machine(), "genre_chance": round(genre_chance(tags), 4),
           "encode": json.loads(timing_path(cache).read_text()) if timing_path(cache).exists() else {},
           "variants": {}, "layer_curves": {}}
    pop = evaluate_popularity(enc, split, "test", all_items=True)
    out["popularity"] = {k: round(pop.overall[k], 4) for k in METRICS}

    def measure(name: str, vecs: np.ndarray, **extra) -> dict:
        test = evaluate_content_knn(enc, split, vecs, "test", all_items=True)
        valid = evaluate_content_knn(enc, split, vecs, "valid", all_items=True)
        row = {**{k: round(test.overall[k], 4) for k in METRICS}, "valid_ndcg@10": round(valid.overall["ndcg@10"], 4),
               "genre_agree@10": round(genre_agreement(vecs, tags), 4),
               "new_items_ndcg@10": round(evaluate_new_items(enc, split, vecs, cold)["ndcg@10"], 4),
               "dims": int(vecs.shape[1]), "users": test.counts["overall"], **extra}
        out["variants"][name] = row
        log(f"{name:<34} test ndcg@10 {row['ndcg@10']:.4f}  valid {row['valid_ndcg@10']:.4f}  genre {row['genre_agree@10']:.3f}")
        return row

    vecs: dict[str, np.ndarray] = {}
    for whiten in (False, True):
        name = "minilm" + (" +whiten" if whiten else "")
        vecs[name] = encode_items(ItemTowerConfig(backbone="minilm", whiten=whiten), data.items, cache)
        measure(name, vecs[name], encoder="all-MiniLM-L6-v2", pooling="mean", layer="last", whiten=whiten,
                encode_wall_s=out["encode"].get("minilm", {}).get("wall_s"))
    n_layers = 30
    for pooling in POOLINGS:
        for whiten in (False, True):
            curve = {}
            for layer in SMOLLM2_LAYERS:
                v = encode_items(smollm2_cfg(pooling, layer, whiten), data.items, cache)
                curve[str(layer if layer is not None else n_layers)] = round(
                    evaluate_content_knn(enc, split, v, "valid", all_items=True).overall["ndcg@10"], 4)
            key = f"smollm2 {pooling}" + (" +whiten" if whiten else "")
            out["layer_curves"][key] = curve
            mids = {int(k): val for k, val in curve.items() if int(k) != n_layers}
            best = max(mids, key=mids.get)  # chosen on VALIDATION, reported on test
            for layer, tag in ((None, "last layer"), (best, f"layer {best}")):
                name = f"smollm2 {pooling} {tag}" + (" +whiten" if whiten else "")
                vecs[name] = encode_items(smollm2_cfg(pooling, layer, whiten), data.items, cache)
                measure(name, vecs[name], encoder="SmolLM2-135M-Instruct (frozen)", pooling=pooling,
                        layer=n_layers if layer is None else layer, whiten=whiten,
                        layer_chosen_on="validation" if layer is not None else None,
                        encode_wall_s=out["encode"].get("smollm2", {}).get("wall_s"))
    if head:
        smol = [n for n in out["variants"] if n.startswith("smollm2")]
        best_smol = max(smol, key=lambda n: out["variants"][n]["valid_ndcg@10"])
        pairs = training_pairs(enc, split, cold)
        rng = np.random.default_rng(0)
        inputs = {"minilm": vecs["minilm"], best_smol: vecs[best_smol],
                  "random vectors (no text)": rng.standard_normal((enc.n_items, 576)).astype(np.float32)}
        out["head"] = {"what": "linear head d->128 over the frozen vectors (standardised), symmetric in-batch InfoNCE "
                               "(temperature 0.05, batch 512, Adam 1e-2, 1000 steps, 1 thread; these settings picked on MiniLM's validation "
                               "NDCG@10 among 3 tries) on pairs of items consumed "
                               "consecutively by one user in the TRAINING part only (each user's last two events excluded), "
                               "pairs touching a cold item excluded",
                       "pairs": int(len(pairs))}
        for src, x in inputs.items():
            t0 = time.perf_counter()
            h, losses = train_head(x, pairs)
            wall = time.perf_counter() - t0
            measure(f"{src} +head", h, encoder=src, head=True, train_wall_s=round(wall, 1),
                    loss_first_last=[round(losses[0], 3), round(float(np.mean(losses[-50:])), 3)])
    out["bench_wall_s"] = round(time.perf_counter() - t_start, 1)
    return out


def format_table(r: dict) -> str:
    head = f"{'variant':<40}{'dims':>5}{'NDCG@10':>9}{'HR@10':>8}{'MRR':>8}{'val N@10':>9}{'genre@10':>9}{'new N@10':>9}"
    lines = [head, "-" * len(head)]
    p = r["popularity"]
    lines.append(f"{'popularity (reference)':<40}{'':>5}{p['ndcg@10']:>9.4f}{p['hr@10']:>8.4f}{p['mrr']:>8.4f}")
    for name, v in r["variants"].items():
        lines.append(f"{name:<40}{v['dims']:>5}{v['ndcg@10']:>9.4f}{v['hr@10']:>8.4f}{v['mrr']:>8.4f}"
                     f"{v['valid_ndcg@10']:>9.4f}{v['genre_agree@10']:>9.3f}{v['new_items_ndcg@10']:>9.4f}")
    lines.append(f"genre agreement of random neighbours: {r['genre_chance']:.3f}")
    for k, t in r.get("encode", {}).items():
        lines.append(f"encode {k}: {t['wall_s']} s for {t['items']} items on {t['machine']['cpu']} "
                     f"({t['machine']['cores']} cores, {t['machine']['torch_threads']} torch thread(s))")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
