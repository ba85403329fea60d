"""``pieceflow``: the one command users meet."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError

from streams.resources import resource_dir
from streams.settings import get_settings
from streams.stack import LocalStack, StackError, log_tail
from streams.topics import check_topics, ensure_internal_topics, ensure_topics

app = typer.Typer(
    help="pieceflow: order management at a batch size of one, on Apache Kafka.",
    no_args_is_help=True,
    add_completion=False,
)
stack_app = typer.Typer(help="The local stack: Kafka (KRaft) and the schema registry.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")


def _stack() -> LocalStack:
    return LocalStack(get_settings(), echo=lambda line: typer.echo(line, err=True))


def fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=1)


@stack_app.command("up")
def stack_up(
    cluster: int = typer.Option(1, help="Number of KRaft nodes: 1, or 3 for fault tests."),
) -> None:
    """Start Kafka and the registry (assembling them from Maven Central on first use)."""
    stack = _stack()
    try:
        started = stack.up(cluster=cluster)
    except StackError as exc:
        raise fail(str(exc)) from exc
    if started:
        typer.echo(f"Stack is up: Kafka at {stack.bootstrap()}, registry at {stack.registry_url()}")
    else:
        typer.echo(f"Stack is already up: Kafka at {stack.bootstrap()}, registry at {stack.registry_url()}")


@stack_app.command("down")
def stack_down(
    purge: bool = typer.Option(False, "--purge", help="Also delete broker data (topics, offsets)."),
) -> None:
    """Stop the processes `stack up` started; data is kept unless --purge."""
    stopped = _stack().down(purge=purge)
    typer.echo(f"Stopped {', '.join(stopped)}." if stopped else "Nothing was running.")
    if purge:
        typer.echo("Broker data deleted.")


@stack_app.command("status")
def stack_status() -> None:
    """Show versions, ports, pids and health of the local stack."""
    stack = _stack()
    health = stack.healthy()
    for component in stack.status():
        kind = "kafka" if component.name.startswith("kafka") else "registry"
        state = (
            "healthy"
            if component.running and health[kind]
            else ("running" if component.running else "stopped")
        )
        pid = component.pid if component.pid is not None else "-"
        typer.echo(f"{component.name:<10} {state:<8} pid {pid!s:<8} {component.detail}")
    if not all(health.values()):
        raise typer.Exit(code=1)


@stack_app.command("logs")
def stack_logs(
    component: str = typer.Argument("kafka-1", help="kafka-1 (kafka-2, kafka-3 in a cluster) or registry."),
    lines: int = typer.Option(50, "-n", "--lines", help="How many lines from the end."),
) -> None:
    """Print the end of a stack component's log."""
    stack = _stack()
    path: Path = stack.logs_dir / f"{component}.log"
    if not path.exists():
        raise fail(f"no log for {component!r} in {stack.logs_dir}; has `pieceflow stack up` run?")
    typer.echo(log_tail(path, lines))


# ---- topics -------------------------------------------------------------------------------------

topics_app = typer.Typer(help="The pipeline's topics: list them, or create them on the cluster.")
app.add_typer(topics_app, name="topics")


@topics_app.callback(invoke_without_command=True)
def topics_list(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Print every topic with its key, value types, writer, partitions and cleanup policy."""
    if ctx.invoked_subcommand is not None:
        return
    from streams.topology import TOPICS

    partitions = get_settings().partitions
    rows = [spec.describe(partitions) for spec in TOPICS]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"{'topic':<26} {'key':<16} {'cleanup':<8} {'parts':>5}  {'writer':<24} values")
    for row in rows:
        typer.echo(
            f"{row['name']:<26} {row['key']:<16} {row['cleanup_policy']:<8} {row['partitions']:>5}  "
            f"{row['writer']:<24} {', '.join(row['values'])}"
        )


@topics_app.command("create")
def topics_create() -> None:
    """Create the topics that do not exist yet (existing ones are left as they are)."""
    from streams.topology import TOPICS

    try:
        created = ensure_topics(TOPICS, get_settings())
    except RuntimeError as exc:
        raise fail(str(exc)) from exc
    typer.echo(f"Created {len(created)} topic(s): {', '.join(created)}" if created else "All topics exist.")


# ---- catalog ------------------------------------------------------------------------------------

catalog_app = typer.Typer(help="Reference data: products and stations, on compacted topics.", no_args_is_help=True)
app.add_typer(catalog_app, name="catalog")


def catalog_path(name_or_file: str) -> Path:
    """A YAML file, or the name of a bundled example catalog (restaurant, footwear)."""
    path = Path(name_or_file)
    if path.is_file():
        return path
    bundled = resource_dir("deploy/catalogs") / f"{name_or_file}.yaml"
    if bundled.is_file():
        return bundled
    names = ", ".join(sorted(p.stem for p in resource_dir("deploy/catalogs").glob("*.yaml")))
    raise fail(f"no catalog file {name_or_file!r}; give a YAML path or one of: {names}")


@catalog_app.command("load")
def catalog_load(
    file: str = typer.Argument(..., help="Catalog YAML, or a bundled example: restaurant, footwear."),
) -> None:
    """Publish a catalog's products and stations to their compacted topics."""
    from streams.catalog import CatalogError, load_catalog_yaml
    from streams.codec import AvroRegistry
    from streams.reference import publish_catalog
    from streams.topology import CATALOG_PRODUCTS, CATALOG_STATIONS

    settings = get_settings()
    path = catalog_path(file)
    try:
        catalog = load_catalog_yaml(path)
        # Only its own topics: on a cluster with ACLs the catalog's user sees no others, and would be
        # refused creating them.
        ensure_topics([CATALOG_PRODUCTS, CATALOG_STATIONS], settings)
        products, stations = publish_catalog(catalog, settings, AvroRegistry.from_url(settings.schema_registry_url))
    except (CatalogError, RuntimeError) as exc:
        raise fail(f"{path}: {exc}") from exc
    typer.echo(f"Loaded catalog {catalog.name!r}: {products} products, {stations} stations.")


# ---- worker -------------------------------------------------------------------------------------


@app.command()
def worker(
    loglevel: str = typer.Option("warn", "--loglevel", "-l", help="Faust log level: crit, error, warn, info, debug."),
) -> None:
    """Run a pipeline worker: every agent (validate, expand, track, assign, reroute) in one process.

    Start more workers (with their own PIECEFLOW_WEB_PORT) to share the partitions.
    """
    from streams.faust_config import prepare_worker_process, run_worker

    prepare_worker_process()
    from streams import topology

    settings = get_settings()
    try:
        ensure_topics(topology.TOPICS, settings)
        ensure_internal_topics(settings.app_id, list(topology.app.tables), settings)
        catalog = topology.reference.load()
    except RuntimeError as exc:
        raise fail(str(exc)) from exc
    try:
        topology.register_output_schemas()
    except Exception as exc:  # connection refused, timeout, a refused schema: all stop the worker here
        raise fail(f"registering the pipeline's output schemas at {settings.schema_registry_url} failed: {exc}; "
                   "check `pieceflow stack status`") from exc
    if not catalog.products:
        raise fail("no catalog on the cluster: run `pieceflow catalog load restaurant` (or a YAML file) first")
    typer.echo(
        f"Worker {settings.app_id}: {len(catalog.products)} products, {len(catalog.stations)} stations; "
        f"metrics at http://{settings.host}:{settings.web_port}/metrics",
        err=True,
    )
    run_worker(topology.app, "pieceflow worker", loglevel, settings.web_port)


# ---- stations -----------------------------------------------------------------------------------

stations_app = typer.Typer(help="The station side (MES): simulate stations working their queues.", no_args_is_help=True)
app.add_typer(stations_app, name="stations")


@stations_app.command("simulate")
def stations_simulate(
    time_scale: float = typer.Option(0.01, help="Simulated seconds per catalog second (0: instant)."),
    stations: str = typer.Option("", help="Comma-separated station ids to simulate (default: all work stations)."),
    fail_rate: float = typer.Option(0.0, help="Share of operations that fail (0..1)."),
    outage_every: float = typer.Option(0.0, help="Seconds between outages of a random station (0: none)."),
    outage_for: float = typer.Option(5.0, help="Seconds an outage lasts."),
    seed: int | None = typer.Option(None, help="Random seed for failures and outages."),
) -> None:
    """Work each station's FIFO queue and report OperationStarted / OperationCompleted, until Ctrl-C."""
    import threading

    from connectors.stations import EVENTS_TOPIC, QUEUE_TOPIC, Faults, StationSimulator
    from streams.codec import AvroRegistry
    from streams.reference import PRODUCTS_TOPIC, STATIONS_TOPIC, ReferenceData

    settings = get_settings()
    registry = AvroRegistry.from_url(settings.schema_registry_url)
    try:
        check_topics([QUEUE_TOPIC, EVENTS_TOPIC, PRODUCTS_TOPIC, STATIONS_TOPIC], settings)
        catalog = ReferenceData(settings, registry).load()
    except RuntimeError as exc:
        raise fail(str(exc)) from exc
    if not catalog.stations:
        raise fail("no stations on the cluster: run `pieceflow catalog load restaurant` (or a YAML file) first")
    simulator = StationSimulator(
        settings, catalog, time_scale=time_scale, stations=[s for s in stations.split(",") if s],
        faults=Faults(fail_rate, outage_every, outage_for, seed), registry=registry,
    )
    typer.echo(f"Simulating {len(simulator.stations)} stations at time scale {time_scale}; Ctrl-C stops.", err=True)
    stop = threading.Event()
    try:
        simulator.run(stop)
    except KeyboardInterrupt:
        stop.set()
    typer.echo(f"Completed {simulator.completed} operations, {simulator.failed} failed.", err=True)


# ---- demo ---------------------------------------------------------------------------------------


@app.command()
def demo(
    scenario: str = typer.Option("restaurant", help="restaurant or footwear."),
    orders: int = typer.Option(40, help="How many orders the simulated storefront places."),
    rate: float = typer.Option(2.0, help="Orders placed per second (wall time)."),
    time_scale: float = typer.Option(0.002, help="Wall seconds per catalog second of station work."),
    policy: str = typer.Option("flow", help="flow, or batch: also replay the orders through legacy batching."),
    output_dir: Path = typer.Option(Path(), help="Where report.json and report.png go."),
    seed: int = typer.Option(7, help="Seed of the simulated storefront."),
) -> None:
    """Run the whole loop locally and end with a lead-time report (report.json, report.png)."""
    from rich.console import Console

    from streams.demo import DemoConfig, DemoError, run_demo
    from streams.stack import StackError

    if policy not in ("flow", "batch"):
        raise fail("--policy takes flow or batch")
    console = Console(stderr=True)
    config = DemoConfig(scenario=scenario, orders=orders, rate=rate, time_scale=time_scale, policy=policy,
                        output_dir=output_dir, seed=seed)
    try:
        result = run_demo(config, get_settings(), console)
    except (DemoError, StackError, RuntimeError) as exc:
        raise fail(str(exc)) from exc
    print_report(result)
    typer.echo(f"Wrote {output_dir / 'report.json'} and {output_dir / 'report.png'}. "
               "`pieceflow stack down` stops the local stack.")


def print_report(result: dict[str, Any]) -> None:
    typer.echo(f"\nLead-time report: {result['scenario']}, {result['orders']} orders, in {result['units']}")
    for name, data in result["policies"].items():
        lead, ratio, work = data["lead_minutes"], data["lead_to_work_ratio"], data["work_minutes"]
        typer.echo(f"\n== {name}: {data['dispatched']} dispatched of {data['placed']} placed "
                   f"({data['amendments']} amendments, {data['cancellations']} cancellations sent)")
        ended = ", ".join(f"{count} {state.lower()}" for state, count in data["outcomes"].items())
        typer.echo(f"  outcomes      {ended}; {data['lost']} lost, {data['out_of_order']} out of order")
        typer.echo(f"  lead time     p50 {lead['p50']:7.1f}  p95 {lead['p95']:7.1f}  p99 {lead['p99']:7.1f}  min")
        typer.echo(f"  work (crit.)  p50 {work['p50']:7.1f}  p95 {work['p95']:7.1f}  p99 {work['p99']:7.1f}  min")
        typer.echo(
            f"  lead / work   p50 {ratio['p50']:7.2f}  p95 {ratio['p95']:7.2f}  p99 {ratio['p99']:7.2f}"
            "  (1 = no waiting)"
        )
        for part, stats in data["stages_minutes"].items():
            typer.echo(f"  {part:<13} p50 {stats['p50']:7.1f}  p95 {stats['p95']:7.1f}  p99 {stats['p99']:7.1f}  min")
        busiest = sorted(data["station_utilisation"].items(), key=lambda kv: -kv[1])[:5]
        typer.echo("  utilisation   " + ", ".join(f"{s} {u:.0%}" for s, u in busiest))
        typer.echo("  rejections    " + (", ".join(f"{r} {n}" for r, n in data["rejections"].items()) or "none"))


# ---- intake -------------------------------------------------------------------------------------

intake_app = typer.Typer(help="The HTTP intake: storefront webhooks and orders in, onto Kafka.", no_args_is_help=True)
app.add_typer(intake_app, name="intake")


@intake_app.command("serve")
def intake_serve(
    port: int | None = typer.Option(None, "--port", help="HTTP port (default: PIECEFLOW_INTAKE_PORT, 8090)."),
    host: str | None = typer.Option(None, "--host", help="Address to bind (default: PIECEFLOW_HOST)."),
    catalog: str | None = typer.Option(
        None, "--catalog", help="Catalog YAML or bundled name; default: the catalog topics on the cluster."
    ),
) -> None:
    """Serve POST /webhooks/shopify, /webhooks/woocommerce, /orders, and GET /metrics, /healthz."""
    from connectors.intake.service import INBOUND_TOPIC, serve

    settings = get_settings()
    try:
        check_topics([INBOUND_TOPIC], settings)
    except RuntimeError as exc:
        raise fail(str(exc)) from exc
    try:
        serve(settings, host=host, port=port, catalog_file=catalog_path(catalog) if catalog else None)
    except RuntimeError as exc:  # Kafka unreachable or no catalog topics at start-up
        raise fail(f"{exc}; or pass --catalog") from exc


# ---- bench --------------------------------------------------------------------------------------


@app.command()
def bench(
    rate: float = typer.Option(200.0, help="Orders per second, sent open-loop at fixed intended times."),
    duration: float = typer.Option(10.0, help="Measured seconds."),
    warmup: float = typer.Option(3.0, help="Seconds sent at the same rate before measuring (not measured)."),
    workers: int = typer.Option(
        1, help="Faust worker processes; with --null, 0 measures the floor: one Kafka leg, no hop."
    ),
    partitions: int | None = typer.Option(
        None, help="Partitions of the pipeline topics (default: what they have; growing needs --grow-partitions)."
    ),
    grow_partitions: bool = typer.Option(
        False, "--grow-partitions", help="Allow --partitions to grow the shared topics (irreversible)."
    ),
    null: bool = typer.Option(False, "--null", help="Baseline: the same hops as raw pass-through, no stage logic."),
    sweep: bool = typer.Option(False, "--sweep", help="Step the rate up; report the highest rate within the SLO."),
    rates: str = typer.Option(
        "250,500,1000,1500,2000,2500,3000,4000", help="Sweep rates (orders/s), comma-separated."
    ),
    slo_ms: float = typer.Option(25.0, help="Sweep SLO: placed→assigned p99 in milliseconds."),
    drain_timeout: float = typer.Option(30.0, help="Seconds to wait for the last orders after the last send."),
    seed: int = typer.Option(7, help="Random seed of the pre-built orders."),
    shared_stack: bool = typer.Option(
        False, "--shared-stack",
        help="Run on the shared local stack's topics instead of a private stack (ports + 2000) started for the run.",
    ),
    output: Path = typer.Option(Path("bench.json"), "--output", "-o", help="JSON report file."),
) -> None:
    """Benchmark the pipeline: latency from intended send time to OperationAssigned and OrderDispatched.

    Starts the local stack if needed, workers and an instant station simulator; stops them afterwards.
    """
    from streams.bench import BenchError, BenchOptions, run_bench, summary_line, write_report
    from streams.stack import StackError

    if rate <= 0 or duration <= 0 or warmup < 0 or workers < (0 if null else 1):
        raise fail("--rate and --duration must be positive, --warmup not negative, --workers at least 1 "
                   "(0 only with --null: the floor, one Kafka leg with no hop)")
    try:
        sweep_rates = tuple(float(r) for r in rates.split(",") if r.strip())
    except ValueError as exc:
        raise fail(f"--rates: {exc}") from exc
    options = BenchOptions(
        rate=rate, duration=duration, warmup=warmup, workers=workers, partitions=partitions,
        grow_partitions=grow_partitions, null=null, sweep=sweep, sweep_rates=sweep_rates, slo_ms=slo_ms,
        drain_timeout=drain_timeout, seed=seed, private_stack=not shared_stack,
    )
    try:
        report = run_bench(options, get_settings())
    except (BenchError, StackError, RuntimeError) as exc:
        raise fail(str(exc)) from exc
    write_report(report, output)
    steps = report["steps"] if sweep else [report]
    typer.echo(f"\nBench ({report['bench']['mode']}, {workers} worker(s), {report['bench']['partitions']} partitions, "
               f"{report['machine']['cpus']} CPUs):", err=True)
    for step in steps:
        typer.echo(summary_line(step), err=True)
    if sweep:
        best = report["sweep"]["max_rate_within_slo"]
        typer.echo(f"Highest rate within {report['sweep']['slo']}: {best if best is not None else 'none'}", err=True)
    typer.echo(f"Report written to {output}", err=True)


# ---- sink ---------------------------------------------------------------------------------------

sink_app = typer.Typer(help="Downstream: the ERP tables in PostgreSQL (PIECEFLOW_DATABASE_URL).", no_args_is_help=True)
app.add_typer(sink_app, name="sink")


@sink_app.command("migrate")
def sink_migrate() -> None:
    """Apply the ERP schema migrations the database does not have yet."""
    import psycopg

    from connectors.erp.schema import MigrationError, migrate_url

    url = get_settings().database_url
    try:
        applied = migrate_url(url)
    except (psycopg.Error, MigrationError) as exc:
        raise fail(f"{url}: {exc}") from exc
    names = ", ".join(f"{m.version:03d}_{m.name}" for m in applied)
    typer.echo(f"Applied {len(applied)} migration(s): {names}" if applied else "The schema is up to date.")


@sink_app.command("erp")
def sink_erp(
    group: str | None = typer.Option(None, "--group", help="Consumer group (default: <PIECEFLOW_APP_ID>-erp-sink)."),
    instance_id: str | None = typer.Option(
        None, "--instance-id", help="Static group membership id: a restart under it takes its partitions back at once."
    ),
    migrate: bool = typer.Option(True, "--migrate/--no-migrate", help="Apply pending migrations at start."),
    loglevel: str = typer.Option("info", "--loglevel", "-l", help="Log level."),
) -> None:
    """Upsert order, operation and dispatch events into PostgreSQL, until Ctrl-C or SIGTERM."""
    import logging
    import signal
    import threading

    import psycopg

    from connectors.erp.schema import MigrationError, migrate_url
    from connectors.erp.sink import ErpSink, SinkUnavailable
    from streams.metrics import serve_metrics

    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "httpx2"):  # one INFO line per registry lookup drowns the sink's own lines
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
    from connectors.erp.rows import TOPICS as SINK_TOPICS

    settings = get_settings()
    try:
        check_topics(list(SINK_TOPICS), settings)
    except RuntimeError as exc:
        raise fail(str(exc)) from exc
    if migrate:
        try:
            migrate_url(settings.database_url)
        except (psycopg.Error, MigrationError) as exc:
            raise fail(f"{settings.database_url}: {exc}") from exc
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    serve_metrics(settings.sink_metrics_port, settings.host)
    sink = ErpSink(settings, group_id=group, instance_id=instance_id)
    typer.echo(
        f"ERP sink: group {sink.group_id}, Kafka {settings.kafka_bootstrap}, metrics at "
        f"http://{settings.host}:{settings.sink_metrics_port}/metrics",
        err=True,
    )
    try:
        totals = sink.run(stop)
    except SinkUnavailable as exc:
        raise fail(str(exc)) from exc
    counts = ", ".join(f"{k} {v}" for k, v in sorted(totals.outcomes.items())) or "nothing"
    typer.echo(f"ERP sink stopped: {counts}.", err=True)

def main() -> None:
    try:
        app()
    except ValidationError as exc:  # settings are read lazily, inside whichever subcommand runs
        typer.secho(f"error: the PIECEFLOW_* settings are not valid:\n{settings_problems(exc)}", fg=typer.colors.RED,
                    err=True)
        raise SystemExit(2) from None


def settings_problems(exc: ValidationError) -> str:
    """One line per problem, named by its environment variable."""
    lines = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        field = "_".join(str(part) for part in error["loc"])
        lines.append(f"  PIECEFLOW_{field.upper()}: {message}" if field else f"  {message}")
    return "\n".join(lines)
