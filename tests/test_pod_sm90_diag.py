"""experiments/pod_sm90_diag.py's host-side helpers (no GPU): the --variants parser, another sample of a
generated sweep (curve --sample), and which points a variant changes (curve --changed)."""
from dataclasses import replace

import pytest

from experiments.pod_sm90_diag import parse_variants, same_plans, sweep_points
from pod.batch import BatchSpec
from pod.kernels.pod_sm90 import PodSm90Config


def test_parse_variants_types_each_value_as_its_field():
    got = parse_variants("static_tail_keys=None;balance=static,cross_rounds=0,overlap=false;static_tail_keys=2048")
    assert got == [("static_tail_keys=None", {"static_tail_keys": None}),
                   ("balance=static,cross_rounds=0,overlap=false",
                    {"balance": "static", "cross_rounds": 0.0, "overlap": False}),
                   ("static_tail_keys=2048", {"static_tail_keys": 2048})]
    assert parse_variants(None) == [("default", {})]
    with pytest.raises(ValueError, match="not FIELD=VALUE"):
        parse_variants("no_such_knob=1")


def test_sweep_points_draws_another_sample_of_the_grid():
    base = {p.point_id for p in sweep_points("paper_grid", "0:2")}
    same = {p.point_id for p in sweep_points("paper_grid")}          # the config's own sample: seed 0, 2
    other = {p.point_id for p in sweep_points("paper_grid", "7:2")}
    assert base == same and len(other) == len(base) and other != base
    assert base <= {p.point_id for p in sweep_points("paper_grid", "0:3")}   # a bigger sample holds the smaller
    with pytest.raises(ValueError, match="draws no sample"):
        sweep_points("paper", "1:2")


def test_same_plans_tells_which_points_a_variant_changes():
    centre = BatchSpec.build(32, 8, 128, [(1024, 12288)], [8192] * 64, page_size=16)
    off = PodSm90Config(static_tail_keys=None)
    assert same_plans(centre, [off, replace(off, bind="stride")], 132)       # binds are not compared
    tails = PodSm90Config(static_tail_keys=2048)
    assert not same_plans(centre, [off, tails], 132)                         # the search splits its tails here
    prefill_only = BatchSpec.build(32, 8, 128, [(1024, 4096)], [], page_size=16)
    assert same_plans(prefill_only, [off, tails], 132)                       # no decode to split
