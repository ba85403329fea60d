"""The Faust settings every pieceflow app runs with (the pipeline, and the benchmark's null baseline)."""

from __future__ import annotations

import logging
import ssl
import sys
from pathlib import Path
from typing import Any, ClassVar

import faust
import mode.loop
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types.transports import ConsumerT, ProducerT
from mode.utils.objects import cached_property
from mode.utils.queues import FlowControlEvent

from streams import aiokafka_consumer, rdkafka_producer
from streams.flow_control import FlowControl
from streams.settings import Settings


class Transport(faust_aiokafka.Transport):
    Consumer: ClassVar[type[ConsumerT]] = aiokafka_consumer.Consumer
    Producer: ClassVar[type[ProducerT]] = rdkafka_producer.Producer
    # librdkafka's connection settings for the producer; aiokafka gets the same as broker credentials.
    kafka_config: dict[str, Any] = {}


class App(faust.App):
    @cached_property
    def flow_control(self) -> FlowControlEvent:
        return FlowControl(loop=self.loop)


def prepare_worker_process() -> None:
    """What a worker process sets before its app starts its event loop."""
    # uvloop takes a good share of the event loop's overhead off every message.
    mode.loop.use("uvloop")
    # Both Kafka libraries build debug records on every fetch and send unless their loggers are above
    # DEBUG (a fifth of a pass-through worker's CPU); the registry client's HTTP library logs one INFO
    # line per lookup, which drowns the worker's own lines (httpx2 is what confluent-kafka 2.16 uses).
    for noisy in ("aiokafka", "faust.topics", "faust.transport", "httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_worker(app: faust.App, command: str, loglevel: str, web_port: int) -> None:
    """Run ``app`` as a Faust worker in this process (blocks until it stops)."""
    Path(app.conf.datadir).parent.mkdir(parents=True, exist_ok=True)
    sys.argv = [command, "worker", "--loglevel", loglevel, "--web-port", str(web_port)]
    app.main()


def new_app(settings: Settings) -> faust.App:
    """A Faust app that consumes through aiokafka (seek-safe batches), produces through librdkafka, and
    keeps its agents' buffers when flow control resumes while records flow."""
    app = App(settings.app_id, **faust_settings(settings))
    transport = Transport(app.conf.broker_consumer, app)
    transport.kafka_config = settings.kafka_config()
    app.transport = transport
    return app


def broker_credentials(settings: Settings) -> faust.auth.Credentials | None:
    """The cluster's security settings as Faust hands them to aiokafka (consumer, topic creation)."""
    context = ssl.create_default_context(cafile=settings.ssl_ca_location) if settings.tls else None
    if settings.sasl:
        assert settings.sasl_password is not None
        return faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password.get_secret_value(),
            mechanism=settings.sasl_mechanism,
            ssl_context=context,
        )
    return faust.SSLCredentials(context) if context is not None else None


def faust_settings(settings: Settings) -> dict[str, Any]:
    return {
        "broker": f"kafka://{settings.kafka_bootstrap}",
        "broker_credentials": broker_credentials(settings),
        "datadir": str(settings.home.resolve() / "faust" / settings.app_id),
        "web_port": settings.web_port,
        "web_host": settings.host,
        "processing_guarantee": "at_least_once",
        "producer_linger": 0.0,  # batch size of one: nothing waits to fill a batch
        "producer_acks": -1,
        "broker_commit_interval": 0.5,
        # When an agent's buffer is full, Faust pauses the partitions that feed it and resumes them
        # once it drains, and a resumed partition waits for the fetcher's next round. With 256 a burst
        # of station events kept the tracking agent pausing: two workers at 15 orders/s measured p50
        # 251 ms placed->assigned, against 66-76 ms with 4096. A rebalance clears these buffers, and
        # what they held is read again from the committed offsets, so the size adds no loss.
        "stream_buffer_maxsize": 4096,
        "stream_wait_empty": True,
        "stream_publish_on_commit": False,
        "consumer_auto_offset_reset": "earliest",
        "topic_partitions": settings.partitions,
        "topic_replication_factor": settings.replication_factor,
        "key_serializer": "raw",
        "value_serializer": "raw",
        "table_cleanup_interval": 3600.0,
        # Stage state is rewritten on every event; a standby would decode every changelog write again
        # (measured: most of a worker's CPU). Recovery replays the changelog on failover instead.
        "table_standby_replicas": 0,
        "web_tables_enabled": False,
    }
