"""Benchmark points: a sweep config (base keys, grids of lists, generators, explicit points) -> Points.

  make_point(values, models)     flat keys (POINT_KEYS) -> Point(model name, validated BatchSpec)
  expand_points(sweep, models)   every point of a sweep config, deterministic order, duplicates removed
  shard(points, index, count)    the points of one multirun shard
  point_id(model, spec)          the stable id a row is keyed by (resume, joins across backends)

A value BatchSpec.from_counts would read quietly one way where a user likely meant another is refused
here, naming the key: `page_size=0` (contiguous KV is `page_size: null`), `num_prefill=0` with a
`chunk_len`, `num_decode=0` with a `decode_context_len`. Everything else is BatchSpec's validation.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from typing import Any, Mapping, Sequence

from pod.batch import BatchSpec, ModelHeads

# Keys a point (and a sweep's `base`) may set. Any of them may be a list inside a grid.
POINT_KEYS = ("model", "num_prefill", "chunk_len", "prefill_context_len", "num_decode",
              "decode_context_len", "page_size", "dtype")
POINT_DEFAULTS = dict(num_prefill=1, chunk_len=0, prefill_context_len=0, num_decode=0,
                      decode_context_len=0, page_size=None, dtype="bfloat16")


@dataclasses.dataclass(frozen=True)
class Point:
    """One benchmark point: a model's name and a batch spec."""

    model: str
    spec: BatchSpec

    @property
    def point_id(self) -> str:
        return point_id(self.model, self.spec)


def point_id(model: str, spec: BatchSpec) -> str:
    """Stable 12-hex-digit id of (model name, batch spec): same across backends, runs and machines."""
    h = spec.heads
    key = dict(model=model, q=h.num_q_heads, kv=h.num_kv_heads, d=h.head_dim, dtype=spec.dtype,
               page_size=spec.page_size,
               prefill=[[c.chunk_len, c.context_len] for c in spec.prefill_chunks],
               decode=list(spec.decode_context_lens))
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def to_container(x: Any) -> Any:
    """An OmegaConf config as plain dicts and lists (anything else as is)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - hydra is a dependency
        return x
    if isinstance(x, (DictConfig, ListConfig)):
        return OmegaConf.to_container(x, resolve=True)
    return x


def heads_of(model_cfg: Mapping[str, Any]) -> ModelHeads:
    return ModelHeads(int(model_cfg["num_q_heads"]), int(model_cfg["num_kv_heads"]),
                      int(model_cfg["head_dim"]))


def _refuse_ambiguous(v: Mapping[str, Any]) -> None:
    page = v["page_size"]
    if isinstance(page, (int, float)) and not isinstance(page, bool) and page == 0:
        raise ValueError("page_size=0 is invalid: a power of two for paged KV, or null for contiguous KV")
    for count, length, part in (("num_prefill", "chunk_len", "prefill"),
                                ("num_decode", "decode_context_len", "decode")):
        if v[count] == 0 and v[length]:
            raise ValueError(f"{count}=0 with {length}={v[length]} is ambiguous: {count} >= 1 for a "
                             f"{part} part, or {length}=0 for none")


def make_point(values: Mapping[str, Any], models: Mapping[str, Mapping[str, Any]]) -> Point:
    """A point from flat keys (POINT_KEYS). chunk_len=0: no prefill; num_decode=0: no decode.
    Validation is BatchSpec's (its ValueError names the field), and `_refuse_ambiguous`'s."""
    unknown = set(values) - set(POINT_KEYS)
    if unknown:
        raise ValueError(f"unknown point keys {sorted(unknown)}; allowed: {POINT_KEYS}")
    v = {**POINT_DEFAULTS, **values}
    if v.get("model") is None:
        raise ValueError("point has no model: set `model` in the sweep's base, grid or point")
    if v["model"] not in models:
        raise ValueError(f"unknown model {v['model']!r}; known: {sorted(models)}")
    _refuse_ambiguous(v)
    counts = {k: v[k] for k in POINT_KEYS if k != "model"}
    spec = BatchSpec.from_counts(heads_of(models[v["model"]]), **counts)
    return Point(str(v["model"]), spec)


def expand_points(sweep: Mapping[str, Any], models: Mapping[str, Mapping[str, Any]]) -> list[Point]:
    """Points of a sweep config, in a deterministic order, duplicates removed (first one kept).

    sweep = {base: {key: value}, grids: [{key: value-or-list}], points: [{key: value}]}:
    every grid is the cross product of its list-valued keys (over `base`); `points` are single
    points (over `base`). Keys are POINT_KEYS, except that a grid axis whose values are dicts of
    POINT_KEYS (any axis name, e.g. `decode: [{num_decode: 16, decode_context_len: 16384}, ...]`)
    sets several keys together: that is how a grid pairs values instead of crossing them.
    A `generate: {kind: <name>, ...}` block adds the points of a generator of
    experiments.harness.paper_grid.GENERATORS (after the grids, before `points`, over `base`); a generator
    may also define models (e.g. heads per GPU under tensor parallelism), added to `models` here.
    """
    sweep = to_container(sweep)
    models = dict(to_container(models))
    base = dict(sweep.get("base") or {})
    out: dict[str, Point] = {}
    generated: list[dict[str, Any]] = []
    if sweep.get("generate"):
        from experiments.harness.paper_grid import GENERATORS
        block = dict(sweep["generate"])
        kind = block.pop("kind", None)
        if kind not in GENERATORS:
            raise ValueError(f"sweep {sweep.get('name')!r}: generate.kind={kind!r}; known: {sorted(GENERATORS)}")
        generated, new_models = GENERATORS[kind](block, models)
        models.update(new_models)
    for grid in sweep.get("grids") or []:
        grid = {**base, **grid}
        keys = list(grid)
        axes = [grid[k] if isinstance(grid[k], list) else [grid[k]] for k in keys]
        for combo in itertools.product(*axes):
            values: dict[str, Any] = {}
            for k, v in zip(keys, combo):
                values.update(v if isinstance(v, dict) else {k: v})
            p = make_point(values, models)
            out.setdefault(p.point_id, p)
    for values in generated:
        p = make_point({**base, **values}, models)
        out.setdefault(p.point_id, p)
    for values in sweep.get("points") or []:
        p = make_point({**base, **values}, models)
        out.setdefault(p.point_id, p)
    if not out:
        raise ValueError(f"sweep {sweep.get('name')!r} has no points (give `grids`, `generate` or `points`)")
    return list(out.values())


def shard(points: Sequence[Point], index: int, count: int) -> list[Point]:
    """Points i with i % count == index: shards of a Hydra multirun split the grid evenly."""
    if not 0 <= index < count:
        raise ValueError(f"shard={index} must be in [0, num_shards={count})")
    return [p for i, p in enumerate(points) if i % count == index]


def kv_tokens(spec: BatchSpec) -> int:
    """KV tokens of the whole batch (prefill context + chunk, decode contexts), every sequence."""
    return sum(c.context_len + c.chunk_len for c in spec.prefill_chunks) + sum(spec.decode_context_lens)
