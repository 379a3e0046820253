"""The test bed's broker is a real Kafka-protocol broker: groups and commits work."""

from confluent_kafka import Consumer, TopicPartition

from service.devtools.localbroker import committed_offsets
from service.devtools.samples import make_samples, produce


def test_produce_consume_commit(bootstrap: str, topic: str) -> None:
    samples = make_samples(events=200, emails=20, audiences=2)
    ends = produce(bootstrap, topic, samples.records)
    assert sum(ends.values()) == 200
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "bed",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
        }
    )
    consumer.subscribe([topic])
    seen = 0
    for _ in range(60):
        seen += len(consumer.consume(500, 0.5))
        if seen >= 200:
            break
    assert seen == 200
    consumer.commit(
        offsets=[TopicPartition(topic, p, o) for p, o in ends.items()], asynchronous=False
    )
    consumer.close()
    assert committed_offsets(bootstrap, "bed", topic, list(ends)) == ends
