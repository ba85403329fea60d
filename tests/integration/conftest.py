"""The real local stack for integration tests: started here when it is not up, stopped if we started it.

A stack that cannot start fails the tests with its log tail; it never skips them.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from streams.catalog import Catalog, load_catalog_yaml
from streams.codec import AvroRegistry
from streams.resources import resource_dir
from streams.settings import Settings
from streams.stack import LocalStack, StackError


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Iterator[LocalStack]:
    local = LocalStack(settings)
    try:
        started = local.up(cluster=local.configured_nodes())
    except StackError as exc:
        pytest.fail(f"the local stack could not start: {exc}", pytrace=False)
    yield local
    if started:
        local.down()


@pytest.fixture(scope="session")
def bootstrap(stack: LocalStack) -> str:
    return stack.bootstrap()


@pytest.fixture(scope="session")
def registry_url(stack: LocalStack) -> str:
    return stack.registry_url()


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    """The restaurant of the seed, which the pipeline tests order from."""
    return load_catalog_yaml(resource_dir("deploy/catalogs") / "restaurant.yaml")


@pytest.fixture(scope="session")
def pipeline_settings(stack: LocalStack, settings: Settings) -> Settings:
    """Settings pointing at the running stack, for workers started as child processes."""
    return stack.client_settings()


@pytest.fixture(scope="session")
def registry(pipeline_settings: Settings) -> AvroRegistry:
    return AvroRegistry.from_url(pipeline_settings.schema_registry_url)


@pytest.fixture
def admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap})


@pytest.fixture
def new_topic(admin: AdminClient) -> Iterator[object]:
    """Create uniquely named topics for one test and delete them after it."""
    created: list[str] = []

    def make(prefix: str, partitions: int = 1, config: dict[str, str] | None = None) -> str:
        name = f"test.{prefix}.{uuid.uuid4().hex[:8]}"
        futures = admin.create_topics([NewTopic(name, partitions, 1, config=config or {})])
        futures[name].result(timeout=30)
        created.append(name)
        return name

    yield make
    if created:
        for future in admin.delete_topics(created).values():
            # A broker killed by a fault test cannot delete; that test has already failed.
            with contextlib.suppress(Exception):
                future.result(timeout=30)


def private_stack(
    settings: Settings, home: Path, port_offset: int, broker_overrides: Mapping[str, object] | None = None
) -> LocalStack:
    """A one-node stack of a test's own: own data and ports, the shared stack's assembled jars (no second
    download). Not started."""
    shared = LocalStack(settings)
    shared.assemble()
    (home / "dist").symlink_to(shared.dist)
    private = settings.model_copy(
        update={
            "home": home,
            "kafka_port": settings.kafka_port + port_offset,
            "registry_port": settings.registry_port + port_offset,
            "registry_management_port": settings.registry_management_port + port_offset,
            "kafka_heap": "384m",
        }
    )
    return LocalStack(private, broker_overrides=broker_overrides)


@pytest.fixture(scope="session")
def fault_stack(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A second, private stack for tests that kill or stop the broker, so the shared one stays up."""
    local = private_stack(settings, tmp_path_factory.mktemp("fault-stack"), 1000)
    try:
        local.up()
    except StackError as exc:
        local.down()
        pytest.fail(f"the fault-test stack could not start: {exc}", pytrace=False)
    yield local
    local.down(purge=True)


@pytest.fixture(scope="session")
def postgres(settings: Settings) -> Iterator[object]:
    """The private PostgreSQL cluster (connectors/erp/localdb.py) at PIECEFLOW_DATABASE_URL, migrated.

    Started here when it is not running and stopped again if this session started it; a server
    that cannot start fails the tests with its log tail, it never skips them.
    """
    from connectors.erp.localdb import LocalDbError, LocalPostgres
    from connectors.erp.schema import migrate_url

    db = LocalPostgres(settings)
    try:
        started = db.start()
        migrate_url(settings.database_url)
    except LocalDbError as exc:
        pytest.fail(f"PostgreSQL could not start: {exc}", pytrace=False)
    yield db
    if started:
        db.stop()
