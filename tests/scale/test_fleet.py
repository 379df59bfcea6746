"""Replicas behind the real router: two `labkit serve` processes pinned a core each, vllm-router in front."""

import json
import os
import urllib.error
import urllib.request

import pytest

from labkit.scale.fleet import POLICIES, Fleet, core_shares, router_binary
from labkit.scale.load import metric


def test_cores_are_shared_out_evenly_and_bad_counts_are_named():
    assert core_shares(2, [0, 1]) == [[0], [1]]
    assert core_shares(2, [4, 5, 6, 7]) == [[4, 5], [6, 7]]
    assert core_shares(1, [3, 1]) == [[1, 3]]
    with pytest.raises(ValueError, match=r"replicas=3 must be between 1 and the 2 cores"):
        core_shares(3, [0, 1])


def _complete(url: str, prompt: str) -> tuple[int, str]:
    body = json.dumps({"model": "smollm2-135m", "prompt": prompt, "max_tokens": 6, "temperature": 0.0}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())["choices"][0]["text"]
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()[:200]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    try:
        router_binary()
    except ValueError as e:
        pytest.skip(str(e))
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("two replicas need two cores")
    with Fleet(2, "smollm2-135m", ("--enable-prefix-caching",), cores=sorted(os.sched_getaffinity(0))[:2],
               log_dir=tmp_path_factory.mktemp("fleet-logs")) as f:
        yield f


@pytest.mark.slow
def test_the_router_spreads_requests_and_answers_as_one_engine(fleet):
    assert sorted(c for r in fleet.members for c in r.cores) == sorted(os.sched_getaffinity(0))[:2]
    url = fleet.route("round_robin")
    answers = [_complete(url, "The capital of France is") for _ in range(4)]
    assert {status for status, _ in answers} == {200}
    assert len({text for _, text in answers}) == 1  # greedy: the same answer whichever replica served it
    served = [metric(r.metrics(), "labkit:request_success_total") for r in fleet.members]
    assert all(n >= 1 for n in served), served  # round-robin used both replicas


@pytest.mark.slow
def test_a_killed_replica_costs_no_silent_loss(fleet):
    url = fleet.route("round_robin")
    fleet.kill(1)
    answers = [_complete(url, f"Count to {i}:") for i in range(4)]
    assert all(status in (200, 502, 503, 500) for status, _ in answers), answers
    assert any(status == 200 for status, _ in answers)  # the live replica still serves through the router


def test_an_unknown_policy_is_named():
    with pytest.raises(ValueError, match=r"policy='fastest' is not one of round_robin, cache_aware"):
        Fleet(0).route("fastest")
    assert "cache_aware" in POLICIES
