"""bench/compare.py's CPU placement arguments (no traffic: parsing only)."""
from __future__ import annotations

import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture(scope="module")
def compare():
    sys.path.insert(0, BENCH)      # compare.py imports its sibling abrun
    try:
        import compare as mod
        yield mod
    finally:
        sys.path.remove(BENCH)


def test_default_placement_is_one_forwarding_lcore_each(compare):
    a = compare.parse_args(["--systems", "dpdk"])
    assert (a.fe_main, a.fe_nb_cores, a.fe_lcores) == ("0", 1, "0,1")
    assert (a.be_main, a.be_nb_cores, a.be_lcores, a.be_fwd) == ("1", 1, "0,1", "0")
    assert a.shardvu_cpus == "0"           # the CPU DPDK vhost's lcore gets


def test_forwarding_ranges_give_several_lcores(compare):
    a = compare.parse_args(["--systems", "dpdk", "--fe-cpus", "0,1-7", "--be-cpus", "0,8-15"])
    assert (a.fe_nb_cores, a.fe_lcores) == (7, "0,1,2,3,4,5,6,7")
    assert (a.be_nb_cores, a.be_lcores) == (8, "0,8,9,10,11,12,13,14,15")
    assert a.shardvu_cpus == "8-15"        # shardvu run --cpus takes the same range


@pytest.mark.parametrize("spec", ["1", "0,1-x", "0,0-3", "0,3-2", "a,1"])
def test_bad_placement_is_refused(compare, spec, capsys):
    with pytest.raises(SystemExit):
        compare.parse_args(["--systems", "dpdk", "--fe-cpus", spec])
    assert "--fe-cpus" in capsys.readouterr().err
