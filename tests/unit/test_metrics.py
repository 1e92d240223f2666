"""Our metric families expose what prometheus-client's own types would (less their `_created` series)."""

from __future__ import annotations

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from sidecard.observe import metrics as ours


def exposition(module, registry: CollectorRegistry) -> str:
    requests = module.Counter("t_requests", "Requests", ["outcome"], registry=registry)
    seconds = module.Histogram("t_seconds", "Time", ["feature"], buckets=(0.1, 1.0, 10.0), registry=registry)
    in_flight = module.Gauge("t_in_flight", "In flight", registry=registry)
    limit = module.Gauge("t_limit", "Limit", ["target"], registry=registry)
    requests.labels("ok").inc()
    requests.labels("ok").inc(2)
    requests.labels("overloaded").inc()
    for value in (0.05, 0.1, 0.5, 3.0, 30.0):
        seconds.labels("chat").observe(value)
    in_flight.inc()
    in_flight.inc()
    in_flight.dec()
    limit.labels("a").set(7)
    limit.labels("b").set(3)
    limit.remove("b")
    text = generate_latest(registry).decode()
    return "\n".join(line for line in text.splitlines() if "_created" not in line)


def test_the_exposition_is_prometheus_clients():
    assert exposition(ours, CollectorRegistry()) == exposition(prometheus_client, CollectorRegistry())


def test_a_histograms_count_is_its_infinite_bucket():
    registry = CollectorRegistry()
    seconds = ours.Histogram("t_seconds", "Time", buckets=(1.0,), registry=registry)
    seconds.observe(0.5)
    seconds.observe(2.0)
    assert registry.get_sample_value("t_seconds_bucket", {"le": "+Inf"}) == registry.get_sample_value("t_seconds_count") == 2
    assert registry.get_sample_value("t_seconds_sum") == 2.5


def test_misuse_is_refused():
    registry = CollectorRegistry()
    counter = ours.Counter("t_total_things", "Things", ["kind"], registry=registry)
    with pytest.raises(ValueError):
        counter.labels("a").inc(-1)
    with pytest.raises(ValueError):
        counter.labels("a", "b")
    with pytest.raises(ValueError):  # the registry refuses a second family of the same name
        ours.Counter("t_total_things", "Things again", registry=registry)


def test_a_label_value_is_its_string_whatever_it_was_given_as():
    registry = CollectorRegistry()
    statuses = ours.Counter("t_statuses", "Statuses", ["status"], registry=registry)
    limits = ours.Gauge("t_limits", "Limits", ["slot"], registry=registry)
    statuses.labels(429).inc()
    statuses(429).inc()
    statuses("429").inc()
    limits(1).set(5)
    limits.remove(1)
    assert registry.get_sample_value("t_statuses_total", {"status": "429"}) == 3
    assert registry.get_sample_value("t_limits", {"slot": "1"}) is None
