"""``umbra bench allocator --quick --json``: one JSON object with the figures the issue names."""

from __future__ import annotations

import json

from store.bench import allocator as bench


def test_quick_json_has_the_required_keys(capsys):
    assert bench.main(["--quick", "--json", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out)  # exactly one JSON object on stdout
    assert result["seed"] == 3 and result["quick"] is True
    assert result["alloc_free_per_s"] > 0
    assert result["bookkeeping_bytes_per_allocation"] > 0
    util = result["util_at_first_failure"]
    for who in ("offset", "slab", "random", "free_ratio_first", "best_fit"):
        for workload in ("uniform_pow2", "uniform_pow2_plus_17", "random_1k_4m"):
            assert workload in util[who], (who, workload)
    # the offset allocator's figures are bin arithmetic: they must match Mooncake's
    assert util["offset"]["uniform_pow2"]["min"] == 1.0
    for size, u in util["offset"]["uniform_pow2_plus_17"]["per_size"].items():
        if int(size) < 8 * 1024 * 1024:
            assert abs(u - 8 / 9) < 0.003, (size, u)
    assert util["offset"]["uniform_pow2_minus_17"]["min"] > 0.99
    # calcification reproduced; the offset allocator does not suffer from it
    assert result["calcification"]["slab"]["util_after_shift"] == 0.0
    assert result["calcification"]["offset"]["util_after_shift"] > 0.9
    assert result["memory"]["within_limit"] is True
    steady = result["steady_state"]
    assert 0.7 < steady["offset_random_1k_64m_2g"]["avg"] < 0.95


def test_seed_makes_the_utilisation_figures_repeatable():
    cfg = bench.make_config(11, quick=True)
    a = bench.bench_first_failure(cfg)
    b = bench.bench_first_failure(cfg)
    assert a == b
