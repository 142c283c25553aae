"""The paper's attention grid (POD-Attention, Fig. 11) as sweep points, and its sample.

A sweep config names this generator with a `generate:` block (conf/sweep/paper_grid.yaml);
`experiments.harness.points.expand_points` calls `generate_points(block, models)` and adds the points
over the sweep's `base`, after its `grids` and before its `points`.

Grid, per model and tensor parallelism (TP):
  heads per GPU   the catalog model's heads / TP (Llama-3-8B 32q/8kv: TP 1/2/4/8 -> 32/8, 16/4, 8/2, 4/1;
                  Yi-6B 32q/4kv: TP 1/2/4 -> 32/4, 16/2, 8/1); head_dim unchanged. Each (model, TP) is a
                  model of its own, named `<model>_tp<TP>`, added to the models the sweep knows.
  chunk c         512 / 1024 / 2048
  context L       4K / 8K / 12K / 16K / 20K
  chunk index i   0 .. L/c - 1: one prefill chunk of c tokens over i*c tokens of context (prefill KV
                  (i+1)*c), and the decodes each over L tokens of KV (decode KV = context)
  decode batch    round-down(f * max_decode_batch(L)) for f in 0.90 / 0.95 / 1.00

max_decode_batch: the largest decode batch whose KV cache fits in the memory left on one GPU:
    KV budget per GPU       = kv_memory_share * card_bytes - weight bytes per GPU
    weight bytes per GPU    = params * 2 (bf16) / TP
    KV bytes a token a GPU  = 2 (K and V) * layers * kv_heads per GPU * head_dim * 2 (bf16)
    max_decode_batch(L)     = floor(KV budget / (KV bytes a token * L))
(after the paper's §6.1: "decode batch at 90/95/100% of the largest that fits in memory";
kv_memory_share = 0.9 is "90% of the card's memory", the weights come out of it). Parameters: Llama-3-8B
8.03e9 (Meta's model card), Yi-6B 6.06e9 (01-ai's model card), 32 layers each; card memory H200 141e9
bytes (NVIDIA's data sheet) - all given in the sweep config, so another card is one override
(`sweep.generate.card_bytes=80e9`). The benchmark holds one layer's KV of that batch (a 32nd of it).

Full grid: 210 (chunk, context, index) triples x 3 batches = 630 points a (model, TP), 4410 in all.
Sample (`sample: {per_stratum: N, seed: S}`; `sample: null` runs the full grid): the strata are
(model, TP, chunk, context), 105 of them; from each, N points (or all, if it has fewer) are drawn
uniformly without replacement from its (chunk index x batch fraction) cells: the first N of the cells
shuffled by `random.Random(f"{S}:{model}:{tp}:{chunk}:{context}")`. A stratum's draw depends only on the
seed and its own key (adding a model leaves the other strata's draws as they were), and the drawn points
keep the grid's order. Every stratum (so every model, TP, chunk and context) is in the sample; the
chunk index and the batch size are what is sampled. Samples of one seed are nested: per_stratum 4 holds
per_stratum 2's points, so growing a sample into the same results file measures only the new points.
The 20% filter (prefill and decode each >= 20% of the serial time) needs measured times: it is applied
by analysis (analysis.paper_figures.balanced_points), not here.
"""
from __future__ import annotations

import math
import random
from typing import Any, Mapping

# Defaults of the `generate:` block (conf/sweep/paper_grid.yaml spells every one out).
DEFAULTS: dict[str, Any] = dict(
    card_bytes=141e9,                      # H200: 141 GB HBM3e
    kv_memory_share=0.9,
    weight_bytes_per_param=2,              # bf16
    kv_bytes_per_element=2,                # bf16
    chunks=[512, 1024, 2048],
    contexts=[4096, 8192, 12288, 16384, 20480],
    batch_fractions=[0.90, 0.95, 1.00],
    sample=None,
)


def tp_model_name(model: str, tp: int) -> str:
    return f"{model}_tp{tp}"


def heads_per_gpu(model_cfg: Mapping[str, Any], tp: int) -> dict[str, int]:
    """The catalog model's attention heads on one GPU under tensor parallelism `tp`."""
    q, kv = int(model_cfg["num_q_heads"]), int(model_cfg["num_kv_heads"])
    if q % tp or kv % tp:
        raise ValueError(f"tensor parallelism {tp} does not divide {q} query / {kv} KV heads")
    return dict(num_q_heads=q // tp, num_kv_heads=kv // tp, head_dim=int(model_cfg["head_dim"]))


def kv_bytes_per_token(num_layers: int, kv_heads_per_gpu: int, head_dim: int, elem_bytes: int = 2) -> int:
    """KV cache bytes one token takes on one GPU, all layers: K and V, each kv_heads x head_dim."""
    return 2 * num_layers * kv_heads_per_gpu * head_dim * elem_bytes


def max_decode_batch(context_len: int, *, params: float, num_layers: int, tp: int, kv_heads_per_gpu: int,
                     head_dim: int, card_bytes: float, kv_memory_share: float = 0.9,
                     weight_bytes_per_param: int = 2, kv_bytes_per_element: int = 2) -> int:
    """The largest decode batch of `context_len`-token requests whose KV fits on one GPU (module doc)."""
    budget = kv_memory_share * card_bytes - params * weight_bytes_per_param / tp
    per_request = kv_bytes_per_token(num_layers, kv_heads_per_gpu, head_dim, kv_bytes_per_element) * context_len
    return max(0, math.floor(budget / per_request))


def grid_cells(block: Mapping[str, Any], models: Mapping[str, Mapping[str, Any]]
               ) -> tuple[list[tuple[tuple, list[dict]]], dict[str, dict]]:
    """([(stratum key (model, tp, chunk, context), [point values in grid order])], {tp model: heads})."""
    b = {**DEFAULTS, **block}
    strata, new_models = [], {}
    for model, m in (b.get("models") or {}).items():
        if model not in models:
            raise ValueError(f"paper grid: unknown model {model!r}; known: {sorted(models)}")
        for tp in m["tp"]:
            heads = heads_per_gpu(models[model], int(tp))
            name = tp_model_name(model, int(tp))
            new_models[name] = {"name": name, **heads}
            for chunk in b["chunks"]:
                for context in b["contexts"]:
                    if context % chunk:
                        raise ValueError(f"paper grid: context {context} is not a multiple of chunk {chunk}")
                    most = max_decode_batch(
                        context, params=float(m["params"]), num_layers=int(m["num_layers"]), tp=int(tp),
                        kv_heads_per_gpu=heads["num_kv_heads"], head_dim=heads["head_dim"],
                        card_bytes=float(b["card_bytes"]), kv_memory_share=float(b["kv_memory_share"]),
                        weight_bytes_per_param=int(b["weight_bytes_per_param"]),
                        kv_bytes_per_element=int(b["kv_bytes_per_element"]))
                    batches = [math.floor(f * most) for f in b["batch_fractions"]]
                    cells = [dict(model=name, num_prefill=1, chunk_len=chunk, prefill_context_len=i * chunk,
                                  num_decode=n, decode_context_len=context)
                             for i in range(context // chunk) for n in batches if n > 0]
                    strata.append(((model, int(tp), int(chunk), int(context)), cells))
    return strata, new_models


def sample_cells(strata: list[tuple[tuple, list[dict]]], sample: Mapping[str, Any] | None) -> list[dict]:
    """Every cell (sample None), or per_stratum cells of each stratum drawn with its own seeded RNG."""
    if not sample:
        return [c for _, cells in strata for c in cells]
    n, seed = int(sample["per_stratum"]), int(sample.get("seed", 0))
    out = []
    for key, cells in strata:
        rng = random.Random(":".join(str(k) for k in (seed, *key)))
        order = list(range(len(cells)))
        rng.shuffle(order)                      # the stratum's cells in a seeded random order ...
        picked = sorted(order[:n])              # ... its first n (nested: n+1 adds one more)
        out += [cells[i] for i in picked]
    return out


def generate_points(block: Mapping[str, Any], models: Mapping[str, Mapping[str, Any]]
                    ) -> tuple[list[dict], dict[str, dict]]:
    """(point values, models to add): what expand_points takes from a `generate: {kind: paper_grid}` block."""
    strata, new_models = grid_cells(block, models)
    return sample_cells(strata, block.get("sample")), new_models


GENERATORS = {"paper_grid": generate_points}
