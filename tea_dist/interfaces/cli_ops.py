"""The distributed part of ``tea-dist``: workers, submitted runs, circuits, a local cluster.

    tea-dist worker [--role flows|runs|all] [--allow pkg.module,...] [--concurrency N]
                    [--queues Q] [--name N] [--metrics-port P]
    tea-dist submit REF --input JSON [--config JSON] [--wait]
    tea-dist status RUN | result RUN [--wait] | cancel RUN
    tea-dist circuits [--reset NAME | --reset-all]
    tea-dist limits [--reset NAME]
    tea-dist cluster [--workers N] [--concurrency N] [--allow M,...] [--flower-port P]
                     [--flower-auth @FILE]

These commands talk to the broker of ``TEA_DIST_BROKER_URL``; with none set, to the cluster a
running ``tea-dist cluster`` advertises; with neither they fail saying how to start one (they
never start a cluster that would die with the command).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from tea_dist.distributed.settings import redact
from tea_dist.interfaces.common import (
    EXIT_RUN_FAILED,
    EXIT_USAGE,
    FLAG,
    DebugOpt,
    app,
    fail,
    interruptible,
    parse_input,
    reporting,
    to_json,
)

RoleOpt = Annotated[str, typer.Option("--role", help="flows (branches), runs (whole runs) or all.")]
RunArg = Annotated[str, typer.Argument(help="A run id printed by submit.", show_default=False)]
AllowOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--allow",
        help="Modules or packages whose callables messages may name (comma-separated, "
        "repeatable; added to TEA_DIST_ALLOWED). Nothing else is imported from a message.",
    ),
]


def allowed_with(base: tuple[str, ...], allow: list[str] | None) -> tuple[str, ...]:
    """``base`` (what the settings allow) with the ``--allow`` values added, in order."""
    entries = list(base)
    for value in allow or ():
        entries += [e.strip() for e in value.split(",") if e.strip()]
    return tuple(dict.fromkeys(entries))


def read_secret(value: str, option: str) -> str:
    """A secret given as ``@FILE`` (``@-``: standard input), never as the value itself."""
    if not value.startswith("@"):
        fail(
            f"{option} takes @FILE (a file holding the secret) or @- (standard input), not the "
            "secret itself: a command line is visible to every user of the machine (ps)",
            EXIT_USAGE,
        )
    source = value[1:]
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        fail(f"{option}: cannot read {source}: {exc.strerror or exc}", EXIT_USAGE)
    return text.strip()


@app.command()
def worker(
    role: RoleOpt = "flows",
    concurrency: Annotated[int | None, typer.Option(help="Worker processes or threads.")] = None,
    queues: Annotated[str | None, typer.Option(help="Queues to consume (comma-separated).")] = None,
    name: Annotated[str | None, typer.Option(help="Node name, default ROLE@HOST.")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    allow: AllowOpt = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus /metrics of all its processes here.")
    ] = None,
) -> None:
    """Run a worker: branch tasks (flows, prefork), whole runs (runs, threads), or both.

    The worker imports only callables from the modules and packages that --allow and
    TEA_DIST_ALLOWED name (plus tea_dist's own helpers), whatever a message asks for.
    """
    from tea_dist.distributed.local_cluster import client_cluster
    from tea_dist.distributed.worker import (
        die_with_parent,
        serve_metrics,
        settings_env,
        worker_argv,
    )

    roles = ["flows", "runs"] if role == "all" else [role]
    single_name = name if len(roles) == 1 else None
    with reporting(False):
        settings = client_cluster().settings
        settings = settings.with_overrides(allowed=allowed_with(settings.allowed, allow))
        argvs = [
            [
                sys.executable,
                "-m",
                "celery",
                *worker_argv(
                    settings,
                    r,
                    concurrency=concurrency,
                    name=single_name,
                    queues=queues,
                    loglevel=loglevel,
                ),
            ]
            for r in roles
        ]
    allowed = ",".join(settings.allowed)
    typer.echo(
        f"tea-dist worker {role} on {redact(settings.broker)}, allowing "
        f"{allowed or 'only tea_dist helpers'}",
        err=True,
    )
    env = {**os.environ, **settings_env(settings)}  # the worker processes' own environment
    if metrics_port:  # this process stays, serving what the worker processes record
        with reporting(False):
            env.update(serve_metrics(settings, role, metrics_port, queues))
    elif len(argvs) == 1:  # the worker becomes this process (signals, PID 1)
        os.execve(sys.executable, argvs[0], env)
    children = [subprocess.Popen(argv, env=env, preexec_fn=die_with_parent()) for argv in argvs]

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    codes = [child.wait() for child in children]
    raise typer.Exit(max(codes))


@app.command("worker-ping")
def worker_ping(role: RoleOpt = "flows", timeout: float = 5.0) -> None:
    """Exit 0 when this host's worker of ROLE answers a ping (a container health check)."""
    from tea_dist.distributed.local_cluster import client_cluster

    with reporting(False):
        celery = client_cluster().app
    target = f"{role}@{socket.gethostname()}"
    replies = celery.control.ping(destination=[target], timeout=timeout)
    if not replies:
        fail(f"worker {target} did not answer within {timeout:g}s", EXIT_RUN_FAILED)
    typer.echo(f"{target}: ok")


@app.command()
def submit(
    ref: Annotated[str, typer.Argument(help="pkg.module:attr (graph or factory) or a YAML path.")],
    input_: Annotated[str, typer.Option("--input", "-i", help="JSON, @file or @-.")] = "{}",
    config: Annotated[str, typer.Option(help="Run config passed to nodes: JSON or @file.")] = "{}",
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait and print the final state.", metavar=FLAG)
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Enqueue a whole workflow run on the run workers; prints its run id (with --wait: the
    id on stderr, the final state alone on stdout). REF is imported from the working
    directory."""
    from tea_dist.distributed.apps import submit as submit_run

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    with reporting(debug):
        run = submit_run(ref, parse_input(input_), parse_input(config, "--config"))
    typer.echo(run.run_id, err=wait)
    if wait:
        with interruptible(), reporting(debug, EXIT_RUN_FAILED):
            typer.echo(to_json(run.result(), indent=2))


@app.command()
def status(run_id: RunArg, debug: DebugOpt = False) -> None:
    """Print a run's status: pending, running, succeeded, failed or cancelled.

    A run another run worker took over (its first one stopped) also shows how many times that
    happened: ``running<TAB>handovers=1``.
    """
    from tea_dist.distributed.apps import WorkflowRun

    with reporting(debug):
        run = WorkflowRun(run_id)
        status, handovers = run.status(), run.handovers()
    typer.echo(f"{status}\thandovers={handovers}" if handovers else status)


@app.command()
def result(
    run_id: RunArg,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait until the run ends.", metavar=FLAG)
    ] = False,
    timeout: Annotated[float | None, typer.Option(help="Seconds to wait at most.")] = None,
    debug: DebugOpt = False,
) -> None:
    """Print a run's final state as JSON (exit 1 if it failed, was cancelled, or is not done)."""
    from tea_dist.distributed.apps import TERMINAL, WorkflowRun

    with reporting(debug):
        run = WorkflowRun(run_id)
        current = run.status()
    with interruptible(), reporting(debug, EXIT_RUN_FAILED):
        if not wait and current not in TERMINAL:
            fail(f"run {run_id} is {current}; use --wait to wait for it", EXIT_RUN_FAILED)
        typer.echo(to_json(run.result(timeout=timeout), indent=2))


@app.command()
def cancel(run_id: RunArg, debug: DebugOpt = False) -> None:
    """Cancel a run: a queued run never starts, a running one has its branches stopped.

    Exits 0 once it ended cancelled; 2 for an unknown run; 1 for a run that already ended
    (nothing is written then) or that ended otherwise (it finished before its driver saw the
    cancel)."""
    from tea_dist.distributed.apps import TERMINAL, WorkflowRun

    with reporting(debug):
        run = WorkflowRun(run_id)
        run.status()  # an unknown run fails here
    with reporting(debug, EXIT_RUN_FAILED):
        if run.status() in TERMINAL:
            fail(f"run {run_id} already ended ({run.status()}): nothing to cancel", EXIT_RUN_FAILED)
        if not run.cancel():
            fail(f"run {run_id} was not cancelled: it is {run.status()}", EXIT_RUN_FAILED)
    typer.echo(f"{run_id} cancelled")


@app.command()
def runs(
    limit: Annotated[int, typer.Option(help="How many of the newest runs.")] = 20,
    debug: DebugOpt = False,
) -> None:
    """List recent submitted runs: id, graph, status, start, duration, hand-overs."""
    from tea_dist.distributed.apps import recent_runs

    with reporting(debug):
        found = recent_runs(limit)
    now = time.time()
    for run in found:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run["created"]))
        seconds = (run["ended"] or now) - run["created"]
        typer.echo(
            f"{run['id']}\t{run['graph']}\t{run['status']}\t{started}\t{seconds:.1f}s"
            f"\thandovers={run['handovers']}"
        )
    if not found:
        typer.echo("no runs", err=True)


@app.command()
def events(
    run_id: RunArg,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow", "-f", help="Keep printing new events until it ends.", metavar=FLAG
        ),
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Print a run's events as JSON lines, from its start."""
    from tea_dist.distributed.apps import WorkflowRun

    with reporting(debug):
        run = WorkflowRun(run_id)
        run.status()  # an unknown run fails here
    with interruptible(), reporting(debug, EXIT_RUN_FAILED):
        for event in run.events(follow=follow):
            sys.stdout.write(to_json(event) + "\n")
            sys.stdout.flush()


@app.command()
def circuits(
    reset: Annotated[str | None, typer.Option(help="Close this circuit.")] = None,
    reset_all: Annotated[
        bool, typer.Option("--reset-all", help="Close every circuit.", metavar=FLAG)
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """List the shared circuits in Redis with their state, or reset them."""
    from tea_dist.distributed.local_cluster import client_cluster

    with reporting(debug):
        store = client_cluster().stores.breakers
        if reset and reset not in (known := store.states()):
            names = ", ".join(sorted(known)) or "none"
            fail(f"no circuit '{reset}' (known circuits: {names})", EXIT_USAGE)
        if reset or reset_all:
            for name, old, new in store.reset(None if reset_all else reset):
                typer.echo(f"{name}: {old} -> {new}")
            return
        for name, state in sorted(store.states().items()):
            snap = store.snapshot(name)
            typer.echo(f"{name}\t{state}\tfailures={snap.failures}")


@app.command()
def limits(
    reset: Annotated[
        str | None, typer.Option(help="Drop this limit's permits and waiters.")
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """List the resource limits in Redis with permits held and waiting, or reset one."""
    from tea_dist.distributed.local_cluster import client_cluster

    with reporting(debug):
        store = client_cluster().stores.limits
        if reset:
            known = store.reset(reset)
            typer.echo(f"{reset}: {'reset' if known else 'nothing held or waiting'}")
            return
        rows = [
            (s.name, s.held, s.max_concurrent, s.waiting, s.rate, s.started)
            for s in store.states().values()
        ]
        if not rows:
            typer.echo("no limit has permits held or waiting", err=True)
        for name, held, most, waiting, rate, started in rows:
            cap = f"held={held}/{most}" if most is not None else f"held={held}"
            pace = f"\trate={rate}\tstarted={started}" if rate else ""
            typer.echo(f"{name}\t{cap}\twaiting={waiting}{pace}")


@app.command()
def cluster(
    workers: Annotated[int, typer.Option(help="Flow worker processes to start.")] = 1,
    concurrency: Annotated[int, typer.Option(help="Branch slots per flow worker.")] = 2,
    flower_port: Annotated[int, typer.Option(help="Flower's port (0: no Flower).")] = 5555,
    flower_auth: Annotated[
        str | None,
        typer.Option(
            help="Flower basic auth: @FILE holding user:password (@- reads stdin). "
            "FLOWER_BASIC_AUTH in the environment works too."
        ),
    ] = None,
    allow: AllowOpt = None,
    reload: Annotated[
        bool,
        typer.Option(
            "--reload",
            help="Restart the workers when an allowed module or a YAML agent changes.",
            metavar=FLAG,
        ),
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Start a local cluster (embedded Redis, workers, Flower) and keep it up until Ctrl-C.

    The other commands (and apps' submit()) on this machine find it by themselves; any
    signal stops it, and even a SIGKILL leaves no process or folder behind."""
    from tea_dist.distributed.advert import advert_path
    from tea_dist.distributed.local_cluster import LocalCluster

    if workers < 0:
        fail(f"--workers must be 0 or more, got {workers}")
    if concurrency < 1:
        fail(f"--concurrency must be 1 or more, got {concurrency}")
    if not 0 <= flower_port <= 65535:
        fail(f"--flower-port must be between 0 (no Flower) and 65535, got {flower_port}")
    auth = read_secret(flower_auth, "--flower-auth") if flower_auth else None
    with interruptible():
        with reporting(debug, EXIT_USAGE):
            local = LocalCluster(
                allowed=allowed_with((), allow),
                flow_workers=workers,
                concurrency=concurrency,
                flower_port=flower_port or None,
                flower_auth=auth,
                advertise=True,
            ).start()
        try:
            typer.echo(f"broker:  {local.redis_url}")
            if local.flower_url:
                typer.echo(f"flower:  {local.flower_url}")
            typer.echo(f"logs:    {local.workdir}")
            typer.echo(f"found:   by tea-dist commands and submit() here ({advert_path()})")
            typer.echo(f"use it:  export TEA_DIST_BROKER_URL={local.redis_url}")
            typer.echo("ready; Ctrl-C (or any signal) stops the cluster.", err=True)
            with _reloader(reload, local.settings) as reloader:
                while (why := local.exited()) is None:
                    time.sleep(0.5)
                    if reloader is not None and (changed := reloader.changed()):
                        shown = ", ".join(changed[:3]) + (" ..." if len(changed) > 3 else "")
                        typer.echo(f"reloading: {shown} changed; restarting the workers", err=True)
                        local.restart_workers()
                        typer.echo("reloaded", err=True)
            typer.echo(f"error: a cluster process exited: {why}; stopping the cluster", err=True)
            raise typer.Exit(EXIT_RUN_FAILED)
        finally:
            local.stop()


def _reloader(enabled: bool, settings: Any) -> Any:
    """What ``cluster --reload`` watches (or nothing without it), as a context manager."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext(None)
    from tea_dist.distributed.reload import Reloader, watched_paths

    agents = Path(settings.agents_dir or os.getcwd())
    paths = watched_paths(settings.allowed, agents)
    typer.echo(f"watching: {', '.join(str(p) for p in paths)}", err=True)
    return Reloader(paths)
