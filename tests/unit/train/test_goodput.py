"""The goodput accountant (vffn_jax/train/goodput.py) on a fake clock: every second charged to exactly one bucket,
the step split, goodput and badput. The perf/ fields of real runs: tests/unit/train/test_wandb_log.py."""
import pytest

from vffn_jax.train.goodput import BUCKETS, Goodput


def test_goodput_accountant_charges_every_second_to_one_bucket():
    t = [100.0]
    clock = Goodput(now=lambda: t[0], started=2.0)  # 2 s of imports before it existed: start-up
    t[0] += 1.0
    with clock("restore"):
        t[0] += 3.0
    clock.switch("compute")
    with clock("compile"):
        t[0] += 10.0
    for _ in range(4):  # four steps of 0.5 s data wait + 1 s compute + 0.5 s logging
        with clock("data_wait"):
            t[0] += 0.5
        t[0] += 1.0
        with clock("logging"):
            with clock("save"):  # nested: the save's second is not logging's
                t[0] += 1.0
            t[0] += 0.5
    totals = clock.snapshot()
    assert totals == {**dict.fromkeys(BUCKETS, 0.0), "startup": 3.0, "restore": 3.0, "compile": 10.0,
                      "data_wait": 2.0, "compute": 4.0, "logging": 2.0, "save": 4.0}
    row, snap = clock.report(None, steps=4)
    assert row["perf/step_time"] == pytest.approx(2.0)
    assert (row["perf/data_wait"], row["perf/compute"], row["perf/logging"]) == pytest.approx((0.5, 1.0, 0.5))
    assert row["perf/wall"] == pytest.approx(28.0) and row["perf/goodput"] == pytest.approx(8.0 / 28.0)
    assert row["perf/goodput"] + sum(v for k, v in row.items() if k.startswith("perf/badput/")) == pytest.approx(1.0)
    assert row["perf/badput/compile"] == pytest.approx(10.0 / 28.0)
    with clock("eval"):  # the next window: 2 steps after an eval of 6 s
        t[0] += 6.0
    with clock("data_wait"):
        t[0] += 1.0
    t[0] += 3.0
    row2, _ = clock.report(snap, steps=2)
    assert (row2["perf/data_wait"], row2["perf/compute"], row2["perf/step_time"]) == pytest.approx((0.5, 1.5, 2.0))
    assert row2["perf/goodput"] == pytest.approx(12.0 / 38.0) and row2["perf/badput/eval"] == pytest.approx(6 / 38)
    with pytest.raises(ValueError, match="unknown goodput bucket 'sleep'"):
        clock.switch("sleep")
