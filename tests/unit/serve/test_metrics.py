"""The /metrics counters (vffn_jax/serve/metrics.py): executed FFN loops against the tokens' own depth, tokens/s
over a window, Prometheus text."""
from vffn_jax.serve.metrics import Metrics, prometheus


class Clock:
    t = 100.0

    def __call__(self):
        return self.t


def test_loops_per_token_against_depth():
    clock = Clock()
    m = Metrics(slots=4, clock=clock)
    # 2 layers; 3 rows in use with depth sums 2+3+4 over layers... the step executed 1.5 and 2.0 loops per row
    m.step([1.5, 2.0], depth_sum=12.0, in_use=3, n_layers=2)
    s = m.snapshot()
    assert s["loops_executed"] == 14.0 and s["loops_free_slots"] == 2.0 and s["token_layers"] == 6
    assert s["mean_token_depth"] == 2.0
    assert s["executed_loops_per_token_in_use"] == 2.0 and abs(s["executed_loops_per_token"] - 14 / 6) < 1e-9


def test_tokens_per_second_window_and_text():
    clock = Clock()
    m = Metrics(slots=2, clock=clock)
    clock.t += 20
    m.tokens(30, prompt=5)
    m.request_done("stop")
    m.gauges(queue_depth=3, slots_in_use=1)
    assert abs(m.tokens_per_s() - 3.0) < 1e-9  # 30 tokens over the 10 s window
    clock.t += 11
    assert m.tokens_per_s() == 0.0
    text = prometheus(m.snapshot(), "vffn-x")
    assert 'vffn_requests_total{model="vffn-x",outcome="stop"} 1' in text
    assert 'vffn_queue_depth{model="vffn-x"} 3' in text and 'vffn_slots_in_use{model="vffn-x"} 1' in text
    assert 'vffn_completion_tokens_total{model="vffn-x"} 30' in text
    assert "# TYPE vffn_ffn_executed_loops_per_token gauge" in text
