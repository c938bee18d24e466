"""services.metrics: names in the exposition, snapshots, ports, a taken port is not fatal."""

from __future__ import annotations

import socket

from prometheus_client import CollectorRegistry, generate_latest

from services import metrics as prom


def test_snapshot_collectors_expose_vllm_and_fairway_names():
    registry = CollectorRegistry()
    scheduler = prom.SnapshotCollector(prom._scheduler_families)
    worker = prom.SnapshotCollector(prom._worker_families)
    registry.register(scheduler)
    registry.register(worker)
    assert generate_latest(registry) == b""  # nothing published yet
    scheduler.publish({"model": "m", "served": {"a": 30.0}, "counters": {"a": 12.5, "b": 3.0},
                       "queued": {"a": 2, "b": 0}, "inflight": {"cpu": 1, "gpu": 0}})
    worker.publish({"model": "m", "running": 3, "waiting": 1, "kv_usage": 0.25, "preemptions": 7,
                    "prefix_cache_queries": 90, "prefix_cache_hits": 64})
    text = generate_latest(registry).decode()
    for line in (
        'fairway:tenant_served_tokens_total{tenant="a"} 30.0',
        'fairway:tenant_virtual_token_counter{tenant="b"} 3.0',
        'fairway:queue_depth{tenant="a"} 2.0',
        'fairway:pool_requests_inflight{pool="cpu"} 1.0',
        'vllm:num_requests_waiting{model_name="m"} 2.0',
        'vllm:num_requests_running{model_name="m"} 3.0',
        'vllm:kv_cache_usage_perc{model_name="m"} 0.25',
        'vllm:num_preemptions_total{model_name="m"} 7.0',
        'vllm:prefix_cache_queries_total{model_name="m"} 90.0',
        'vllm:prefix_cache_hits_total{model_name="m"} 64.0',
    ):
        assert line in text, line


def test_length_and_worker_observations_land_in_the_process_registry():
    prom.observe_length("unit-model", predicted=8.0, actual=4)
    prom.observe_worker_finish("unit-model", "length", prompt_tokens=5, output_tokens=4)
    text = generate_latest(prom.REGISTRY).decode()
    assert 'fairway:output_length_actual_over_predicted_bucket{le="0.5",model_name="unit-model"} 1.0' in text
    assert 'vllm:generation_tokens_total{model_name="unit-model"}' in text
    assert 'vllm:request_success_total{finished_reason="length",model_name="unit-model"}' in text


def test_ports_defaults_override_and_off():
    assert prom.metrics_port("scheduler", None) == 9101
    assert prom.metrics_port("cpu-worker", 9300) == 9300
    assert prom.metrics_port("scorer", 0) == 0
    assert prom.serve("scorer", 0) == 0


def test_a_taken_port_is_logged_not_fatal():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert prom.serve("scheduler", sock.getsockname()[1]) == 0
