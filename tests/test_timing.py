"""fastconv.timing with an injected clock: what is called in which order, and the statistics."""
import statistics

import pytest
import torch

from fastconv import timing


class FakeClock:
    """Time advances only when a fake variant says how long it took."""

    def __init__(self):
        self.t = 100.0
        self.log = []

    def __call__(self):
        return self.t

    def variant(self, name, durations):
        it = iter(durations)

        def fn(*args):
            self.log.append((name,) + args)
            self.t += next(it)
        return fn


def test_compare_warms_up_then_alternates_and_rotates_who_goes_first():
    c = FakeClock()
    fns = {n: c.variant(n, [1.0] * 50) for n in ("a", "b", "c")}
    timing.compare(fns, rounds=4, calls=2, warmup=1, clock=c)
    names = [e[0] for e in c.log]
    assert names[:3] == ["a", "b", "c"]  # warm-up, one each
    rounds = names[3:]
    assert rounds == (["a"] * 2 + ["b"] * 2 + ["c"] * 2 + ["b"] * 2 + ["c"] * 2 + ["a"] * 2
                      + ["c"] * 2 + ["a"] * 2 + ["b"] * 2 + ["a"] * 2 + ["b"] * 2 + ["c"] * 2)


def test_compare_statistics_per_call_and_per_round():
    c = FakeClock()
    # warm-up call (ignored), then 3 rounds x 2 samples x inner 2 calls
    durs = [99.0] + [1, 3, 2, 2, 5, 7, 4, 4, 10, 10, 6, 8]
    s = timing.compare({"x": c.variant("x", durs)}, rounds=3, calls=2, inner=2, warmup=1,
                       clock=c)["x"]
    assert s.samples == (2.0, 2.0, 6.0, 4.0, 10.0, 7.0)
    assert s.rounds == (2.0, 5.0, 8.5)
    assert s.median == 5.0 and s.min == 2.0 and s.max == 10.0
    q = statistics.quantiles(s.samples, n=4, method="inclusive")
    assert (s.q1, s.q3) == (q[0], q[2]) and s.iqr == q[2] - q[0]
    assert s.q1 == 2.5 and s.q3 == 6.75
    assert s.fmt("s") == "5 s [2.5-6.75]"
    assert s.to_dict()["rounds"] == [2.0, 5.0, 8.5]


def test_inputs_rotate_per_variant():
    c = FakeClock()
    fns = {n: c.variant(n, [1.0] * 20) for n in ("a", "b")}
    timing.compare(fns, rounds=2, calls=2, warmup=1, inputs=["x0", "x1", "x2"], clock=c)
    a = [e[1] for e in c.log if e[0] == "a"]
    b = [e[1] for e in c.log if e[0] == "b"]
    assert a == ["x0", "x1", "x2", "x0", "x1"] and b == a


def test_ratio_pairs_rounds_and_flags():
    base = timing.Stats.of([2.0] * 5, [2.0, 2.0, 2.0, 2.0, 2.0])
    fast = timing.Stats.of([1.0] * 5, [1.0, 1.0, 1.0, 1.0, 1.0])
    r = timing.ratio(base, fast)
    assert r.paired and r.value == 2.0 and r.significant and not r.wide and r.flag == ""
    # a drift that hits both variants alike cancels in the pairs
    drift = timing.ratio(timing.Stats.of([1, 2, 4], [1, 2, 4]),
                         timing.Stats.of([0.5, 1, 2], [0.5, 1, 2]))
    assert (drift.value, drift.low, drift.high) == (2.0, 2.0, 2.0)
    # the same spreads unpaired: conservative interval from the quartiles, wide
    unp = timing.ratio(timing.Stats.of([1, 2, 4]), timing.Stats.of([0.5, 1, 2, 3]))
    assert not unp.paired and unp.wide and "more rounds" in unp.flag


def test_ratio_overlapping_one_is_not_significant():
    r = timing.ratio(timing.Stats.of([1.0, 1.1, 0.9], [1.0, 1.1, 0.9]),
                     timing.Stats.of([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]))
    assert r.low < 1.0 < r.high and not r.significant
    assert "not significant" in r.flag
    slower = timing.ratio(timing.Stats.of([1.0] * 3, [1.0] * 3),
                          timing.Stats.of([1.5, 1.6, 1.55], [1.5, 1.6, 1.55]))
    assert slower.high < 1.0 and slower.significant and not slower.wide


def test_wide_threshold():
    ok = timing.Ratio(2.0, 1.95, 2.05, True)
    wide = timing.Ratio(2.0, 1.85, 2.1, True)
    assert not ok.wide and wide.wide and wide.significant
    assert wide.fmt() == "2.00x [1.85-2.10]"
    assert not timing.Ratio(0.95, 0.9, 1.0, True).significant  # touching 1.0 is overlapping
    assert not timing.Ratio(1.05, 1.0, 1.1, True).significant


def test_bad_arguments():
    with pytest.raises(ValueError, match="rounds"):
        timing.compare({"a": lambda: None}, rounds=0)
    with pytest.raises(ValueError, match="no variants"):
        timing.compare({})
    with pytest.raises(ValueError, match="no samples"):
        timing.Stats.of([])


def test_real_clock_on_cpu():
    x = torch.randn(64, 64)
    res = timing.compare({"mm": lambda: x @ x, "add": lambda: x + x}, rounds=3, calls=2)
    assert all(len(s.samples) == 6 and s.min > 0 for s in res.values())
    assert timing.calls_for(lambda: x + x, 0.001) >= 1
    assert timing.rotation_count(1 << 20, "cpu") == 3


def test_peaks_cpu_small():
    p = timing.peaks("cpu", rounds=2, size=128, copy_mib=4)
    assert p["device"] == "cpu" and p["matmul_tflops"]["fp32"] > 0 and p["copy_gbs"] > 0
