"""Pure arithmetic of the control-plane benchmark's messaging floor."""

from __future__ import annotations

import pytest

from bench import bench_control_plane as bench

# rabbit_global_counters:overview() as `rabbitmqctl eval` prints it (RabbitMQ 3.x; the
# dead-letter and stream sections trimmed to one each).
OVERVIEW = """#{[{protocol,amqp091}] =>
      #{consumers => 3,messages_confirmed_total => 118,
        messages_received_confirm_total => 118,messages_received_total => 120,
        messages_routed_total => 120,messages_unroutable_dropped_total => 0,
        messages_unroutable_returned_total => 2,publishers => 4},
  [{protocol,amqp091},{queue_type,rabbit_classic_queue}] =>
      #{messages_acknowledged_total => 0,
        messages_delivered_consume_auto_ack_total => 40,
        messages_delivered_consume_manual_ack_total => 0,
        messages_delivered_get_auto_ack_total => 0,
        messages_delivered_get_manual_ack_total => 0,
        messages_delivered_total => 40,messages_get_empty_total => 0,
        messages_redelivered_total => 0},
  [{protocol,amqp091},{queue_type,rabbit_quorum_queue}] =>
      #{messages_acknowledged_total => 99,
        messages_delivered_consume_auto_ack_total => 0,
        messages_delivered_consume_manual_ack_total => 100,
        messages_delivered_get_auto_ack_total => 0,
        messages_delivered_get_manual_ack_total => 0,
        messages_delivered_total => 100,messages_get_empty_total => 0,
        messages_redelivered_total => 1},
  [{protocol,amqp091},{queue_type,rabbit_stream_queue}] =>
      #{messages_acknowledged_total => 5,
        messages_delivered_total => 7,messages_get_empty_total => 0},
  [{queue_type,rabbit_quorum_queue},{dead_letter_strategy,at_least_once}] =>
      #{messages_dead_lettered_confirmed_total => 3,
        messages_dead_lettered_rejected_total => 3}}
"""


def test_global_counters_are_read_per_queue_type():
    assert bench.parse_global_counters(OVERVIEW) == {
        "published": 120,
        "confirmed": 118,
        "delivered_quorum": 100,
        "delivered_classic": 40,
        "acknowledged": 99,  # quorum and classic queues; streams are not the pipeline's
    }


def test_counters_with_no_amqp_traffic_read_zero():
    assert set(bench.parse_global_counters("#{}").values()) == {0}


def test_per_request_divides_each_counter_by_the_requests():
    before = bench.parse_global_counters("#{}")
    after = bench.parse_global_counters(OVERVIEW)
    per = bench.BrokerCounters.per_request(before, after, 20)
    assert per["published"] == 6.0
    assert per["delivered_quorum"] == 5.0 and per["delivered_classic"] == 2.0
    assert per["delivered"] == 7.0


def test_bound_charges_each_message_its_floor_cost():
    floor = {
        "publish": {"cpu_ms": 0.4},
        "deliver": {"cpu_ms": 0.3},
        "hop_latency_ms": {"median": 1.5},
    }
    bound = bench.messaging_bound(floor, {"published": 5.0, "delivered": 6.0}, cores=2)
    assert bound["messaging_cpu_ms_per_request"] == pytest.approx(5 * 0.4 + 6 * 0.3)
    assert bound["max_request_throughput"] == pytest.approx(2 * 1000 / 3.8, abs=0.1)
    assert bound["min_added_latency_ms"] == pytest.approx(bench.CRITICAL_PATH_HOPS * 1.5)
