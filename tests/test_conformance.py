"""Every ring walker follows one specification (shardvu.ringrules): over one
corpus of edge and hostile rings (shardvu.testing.ringcorpus), on CPython
and on PyPy, each walker's outcome is the reference walker's: the frames,
the used elements published, broken or not (and why), the drops by reason,
the next avail index and guest memory outside the ring.

The batch rule, as ringrules.BATCH_RULE states it: chains before the first
bad chain of a batch are completed and published with the batch; the bad
chain and everything after it are not consumed, the queue is broken with
the first bad chain's reason and nothing is notified.  Dropped frames are
not bad chains: the batch goes on (a dropped TX frame's chain is used with
length 0, a dropped RX frame leaves its buffer posted).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardvu.reasons import BrokenReason, DropReason
from shardvu.ringrules import BATCH_RULE, POLICY, policy_markdown
from shardvu.testing import ringcorpus as rc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPY = os.path.join(ROOT, ".venv-pypy", "bin", "python")
#: the random rings both interpreters run (seeded, so they run the same ones)
RANDOM_SEED, RANDOM_COUNT = 2026, 150


@pytest.fixture(autouse=True)
def _quiet(caplog):
    caplog.set_level(logging.CRITICAL, logger="shardvu.virtqueue")


def _check(case: rc.Case) -> None:
    ref = rc.outcome_json(rc.run_reference(case))
    walkers = rc.walkers_for(case)
    assert len(walkers) >= 4
    for w in walkers:
        assert rc.outcome_json(rc.run_case(case, w)) == ref, (case.name, w)


@pytest.mark.parametrize("case", rc.CORPUS, ids=lambda c: c.name)
def test_corpus_every_walker_matches_the_reference(case):
    _check(case)


def test_corpus_covers_every_policy_class():
    """Each POLICY row is exercised: the corpus's outcomes include every
    broken reason the ring rules name and every drop reason a walker
    counts."""
    broken, drops = set(), set()
    for case in rc.CORPUS:
        out, _ = rc.run_reference(case)
        if out.broken is not None:
            broken.add(out.broken)
        drops |= {r for r, n in out.drops.items() if n}
    rule_broken = {r.reason for r in POLICY.values() if r.outcome == "broken"}
    rule_drops = {r.reason.value for r in POLICY.values() if r.outcome == "drop"}
    assert rule_broken <= broken
    assert rule_drops <= drops
    assert all(isinstance(r.reason, BrokenReason if r.outcome == "broken" else DropReason)
               for r in POLICY.values())
    assert "rx_buffer_too_small" in policy_markdown() and "not consumed" in BATCH_RULE


def test_batch_rule_tx_bad_chain_in_the_middle():
    """The frame before the bad chain is forwarded and published; the bad
    chain (a writable descriptor: it killed the TX worker with IndexError)
    and the one after it are not consumed."""
    case = next(c for c in rc.CORPUS if c.name == "tx_writable_desc")
    for w in rc.walkers_for(case):
        out, _ = rc.run_case(case, w)
        assert out.broken is BrokenReason.WRONG_DIRECTION, w
        assert out.used == ((0, 0),) and len(out.frames) == 1 and out.last_avail == 1, w


def test_policy_length_only_bad_tx_buffers():
    """0xFFFFFFFF and past-the-end lengths break the queue (hostile); a
    frame shorter than the header is dropped and counted, and the batch
    goes on."""
    for name, broken in (("tx_len_ffffffff", True), ("tx_len_past_end", True),
                         ("tx_short_frame", False)):
        case = next(c for c in rc.CORPUS if c.name == name)
        for w in rc.walkers_for(case):
            out, _ = rc.run_case(case, w)
            if broken:
                assert out.broken is BrokenReason.OUTSIDE_MEMORY and len(out.used) == 1, (name, w)
            else:
                assert out.broken is None and out.drops["short_frame"] == 1, (name, w)
                assert len(out.used) == 3 and len(out.frames) == 2, (name, w)


def test_policy_rx_buffer_too_small_is_counted_not_used_empty():
    case = next(c for c in rc.CORPUS if c.name == "rx_too_small")
    for w in rc.walkers_for(case):
        out, _ = rc.run_case(case, w)
        assert out.drops["rx_buffer_too_small"] >= 1, w
        assert all(ln > 0 for _h, ln in out.used), w       # never used length 0
        assert out.broken is None, w


def test_buffer_spanning_two_regions_is_one_buffer():
    """Accepted by every walker, the fast ones included (they hand it to
    the general path instead of breaking the queue)."""
    for name in ("tx_spans_regions", "tx_spans_regions_first", "rx_spans_regions"):
        case = next(c for c in rc.CORPUS if c.name == name)
        for w in rc.walkers_for(case):
            out, _ = rc.run_case(case, w)
            assert out.broken is None and len(out.used) == len(case.heads), (name, w)


def test_random_rings_seeded():
    for case in rc.random_cases(RANDOM_SEED, RANDOM_COUNT):
        _check(case)


_ADDR = st.sampled_from(rc._ADDRS) | st.integers(0, rc.END + 0x100)
_LEN = st.sampled_from(rc._LENS) | st.integers(0, 0x3000)
_FLAGS = st.sampled_from((0, 1, 2, 3, 4, 5, 6))
_DESC = st.tuples(st.integers(0, 7), _ADDR, _LEN, _FLAGS, st.integers(0, 9))


@st.composite
def _cases(draw):
    direction = draw(st.sampled_from(("tx", "rx")))
    table = rc._table(*(d[1:] for d in draw(st.lists(_DESC, min_size=1, max_size=4))))
    return rc.Case(
        "hypothesis", direction, tuple(draw(st.lists(_DESC, min_size=1, max_size=12))),
        tuple(draw(st.lists(st.integers(0, 9), min_size=1, max_size=8))),
        draw(st.sampled_from((None,) * 4 + (0, 3, 9, 100, 0xFFFF))), ((rc.IT, table),),
        tuple(draw(st.lists(st.binary(min_size=0, max_size=300), max_size=6))),
        num=8, hdr_len=draw(st.sampled_from((10, 12))), mergeable=draw(st.booleans()),
        indirect=draw(st.booleans()), budget=draw(st.integers(1, 64)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(_cases())
def test_hypothesis_random_rings(case):
    _check(case)


@pytest.mark.skipif(not os.path.exists(PYPY), reason="no PyPy worker venv (.venv-pypy)")
def test_pypy_outcomes_equal_cpython():
    """The same corpus and seeded random rings under PyPy: each walker's
    outcome there equals the reference there, and equals CPython's."""
    out = subprocess.run([PYPY, "-m", "shardvu.testing.ringcorpus", "--random", str(RANDOM_COUNT),
                          "--seed", str(RANDOM_SEED)], cwd=ROOT, capture_output=True, text=True,
                         timeout=500)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["implementation"] == "pypy"
    cases = list(rc.CORPUS) + rc.random_cases(RANDOM_SEED, RANDOM_COUNT)
    assert set(report["cases"]) == {c.name for c in cases}
    for case in cases:
        there = report["cases"][case.name]
        ref = rc.outcome_json(rc.run_reference(case))
        assert there["reference"] == ref, case.name
        assert set(there) == {"reference", *rc.walkers_for(case)}
        for w, got in there.items():
            assert got == ref, (case.name, w)


# -- the worker's data side: counters by reason, broken state, no crash --------

@pytest.fixture
def sink_worker():
    from shardvu.workers import ctl
    from shardvu.workers.ports import resolve
    from shardvu.workers.worker import Worker
    mine, theirs = ctl.socketpair()
    w = Worker(1, theirs, resolve("sink"), 64, None)
    envs = []

    def on(case: rc.Case):
        env = rc._Env(case)
        envs.append(env)
        w.vq, w.mem = env.vq, env.mem
        w.cache = w.cache.__class__(env.mem)
        return env
    yield w, on
    for env in envs:
        env.close()
    mine.close()
    theirs.close()


def test_worker_survives_a_writable_descriptor_in_tx(sink_worker):
    """Was an IndexError in split_loop.tx_pass that killed the TX worker
    for good: now the frame before it is counted, the queue broken."""
    w, on = sink_worker
    on(next(c for c in rc.CORPUS if c.name == "tx_writable_desc"))
    assert w.pass_once() == 1
    w._sync_counters()
    c = w.counters
    assert w.vq.broken and c.state == "broken" and c.broken_reason == "wrong_direction"
    assert c.ring_errors == 1 and c.packets == 1 and "device-writable" in c.broken_detail
    w.vq.reset()                      # a ring reset: the broken reason does not outlive it
    w._sync_counters()
    assert c.broken_reason is None and c.broken_detail is None and c.state != "broken"


def test_worker_counts_drops_by_reason(sink_worker):
    w, on = sink_worker
    on(next(c for c in rc.CORPUS if c.name == "tx_oversize_frame")._replace(max_frame=-1))
    w.pass_once()
    on(next(c for c in rc.CORPUS if c.name == "tx_short_frame"))
    w.pass_once()
    c = w.counters
    d = c.drops_dict()
    assert set(d) == {r.value for r in DropReason}               # a fixed, bounded set
    assert d["short_frame"] == 1 and c.drops == sum(d.values())
    # MAX_FRAME is the sink's limit: the corpus's slot-sized frame is not oversize here
    assert d["oversize_frame"] == 0 and c.packets == 3 + 2
