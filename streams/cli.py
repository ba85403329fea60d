"""``pieceflow``: the one command users meet."""

from __future__ import annotations

from pathlib import Path

import typer

from streams.settings import get_settings
from streams.stack import LocalStack, StackError, log_tail

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


def main() -> None:
    app()
