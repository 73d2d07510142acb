"""The ``rabbitmq_url`` fixture gives a broker that takes and hands back a message."""

from __future__ import annotations

import uuid

import pytest

pytestmark = pytest.mark.rabbitmq


def test_rabbitmq_round_trip_on_a_queue_of_its_own(rabbitmq_url: str) -> None:
    from kombu import Connection, Exchange, Queue

    name = f"tea-test.{uuid.uuid4().hex[:12]}"
    exchange = Exchange(name, type="direct", durable=False, auto_delete=True)
    queue = Queue(name, exchange, routing_key=name, durable=False, auto_delete=False)
    with Connection(rabbitmq_url, connect_timeout=5) as connection:
        channel = connection.channel()
        bound = queue(channel)
        bound.declare()
        try:
            connection.Producer(channel).publish(
                {"hello": name}, exchange=exchange, routing_key=name, serializer="json"
            )
            with connection.SimpleQueue(bound) as simple:
                message = simple.get(timeout=5)
                message.ack()
            assert message.payload == {"hello": name}
        finally:
            bound.delete()
            exchange(channel).delete()
