"""The arithmetic of load: SLOs, goodput, the knee, Little's law, reading /metrics."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from labkit.scale.load import SLO, attainment, default_slo, goodput, in_flight, knee, knee_sentence, littles_law, metric

REQ = st.fixed_dictionaries({"ttft_ms": st.one_of(st.none(), st.floats(0, 1e4)),
                             "tpot_ms": st.one_of(st.none(), st.floats(0, 1e3)),
                             "error": st.one_of(st.none(), st.just("HTTP 503"))})


@given(st.lists(REQ, max_size=40), st.floats(0.1, 100), st.one_of(st.none(), st.floats(1, 1e4)),
       st.one_of(st.none(), st.floats(1, 1e3)))
def test_goodput_counts_completed_requests_within_every_target(reqs, duration, ttft, tpot):
    g = goodput(reqs, duration, ttft, tpot)
    assert 0 <= g <= sum(1 for r in reqs if r["error"] is None) / duration + 1e-12
    assert goodput(reqs, duration) >= g  # no target never counts fewer
    tighter = goodput(reqs, duration, ttft / 2 if ttft else 1.0, tpot)
    assert tighter <= g + 1e-12


def test_a_one_token_answer_meets_no_tpot_target():
    one = [{"ttft_ms": 10.0, "tpot_ms": None, "error": None}]
    assert goodput(one, 1.0, 100.0) == 1.0
    assert goodput(one, 1.0, 100.0, 50.0) == 0.0


@pytest.mark.parametrize("kwargs, match", [({"ttft_ms": 0}, "ttft_ms=0 must be a positive"),
                                           ({"tpot_ms": -3}, "tpot_ms=-3 must be a positive")])
def test_bad_slos_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SLO(**kwargs)


def test_default_slo_is_slack_times_the_lone_request():
    assert default_slo(120.0, 30.0) == SLO(600.0, 150.0)
    with pytest.raises(ValueError, match="slack=0.5 must be at least 1"):
        default_slo(120.0, 30.0, slack=0.5)
    with pytest.raises(ValueError, match="duration_s=0 must be positive"):
        goodput([], 0)


def test_knee_is_the_last_rate_where_ninety_percent_meet_the_slo():
    rates = [0.5, 1, 2, 4, 8]
    assert knee(rates, [1.0, 0.95, 0.9, 0.6, 0.2]) == 2
    assert knee(rates, [1.0, 1.0, 1.0, 1.0, 0.91]) == 8  # never fell below: the knee lies beyond
    assert knee(rates, [0.5, 1.0, 1.0, 1.0, 1.0]) is None  # below from the start: nothing counts after it
    assert knee(rates, [1.0, 0.7, 1.0, 1.0, 1.0]) == 0.5  # a recovery after a miss does not count
    with pytest.raises(ValueError, match="increasing order"):
        knee([2, 1], [1, 1])


def test_attainment_counts_failures_as_misses():
    reqs = [{"ttft_ms": 10.0, "tpot_ms": 5.0, "error": None}, {"ttft_ms": 900.0, "tpot_ms": 5.0, "error": None},
            {"ttft_ms": None, "tpot_ms": None, "error": "HTTP 503"}, {"ttft_ms": 20.0, "tpot_ms": 5.0, "error": None}]
    assert attainment(reqs, 100.0, 10.0) == 0.5
    assert attainment(reqs) == 0.75


def test_knee_sentence_is_computed_from_the_sweep():
    text = knee_sentence([1, 2, 4], [1.0, 1.9, 1.2], [1.0, 0.95, 0.4], [300.0, 500.0, 9000.0], SLO(600, 150))
    assert text.startswith("The knee is at 2 req/s") and "only 40 % did" in text and "500 to 9,000 ms" in text
    assert "The most goodput measured was 1.90 req/s, at 2 req/s offered." in text
    assert "beyond" in knee_sentence([1, 2], [1.0, 2.0], [1.0, 1.0], [1.0, 1.0], SLO(600, 150))
    assert "only 50 % of requests" in knee_sentence([1, 2], [0.5, 0.4], [0.5, 0.2], [1.0, 1.0], SLO(600, 150))


def test_littles_law_on_a_queue_that_holds_two_requests_for_four_seconds():
    law = littles_law([2.0] * 10, arrival_rate=0.5, mean_latency_s=4.0)
    assert law == {"L_measured": 2.0, "L_predicted": 2.0, "ratio": 1.0}
    with pytest.raises(ValueError, match="no samples"):
        littles_law([], 1.0, 1.0)


def test_metrics_are_read_from_prometheus_text():
    text = ('# HELP labkit:num_requests_in_flight x\n# TYPE labkit:num_requests_in_flight gauge\n'
            'labkit:num_requests_in_flight{model_name="tiny"} 3.0\n'
            'labkit:prefix_cache_hits_total{model_name="tiny"} 48.0\n')
    assert in_flight(text) == 3.0 and metric(text, "labkit:prefix_cache_hits_total") == 48.0
    with pytest.raises(ValueError, match="not a labkit server"):
        metric(text, "vllm:num_requests_running")
