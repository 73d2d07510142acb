"""The deployment files: every service of docker-compose.yml runs a real tea_dist entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"


def services() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def tea_dist_commands() -> set[str]:
    from typer.main import get_command

    from tea_dist.interfaces.cli import app

    return set(get_command(app).commands)  # type: ignore[attr-defined]


def check_entry_point(argv: list[str], where: str) -> None:
    """``argv``: ``tea-dist CMD`` or ``celery -A tea_dist.distributed.worker_app worker|flower``."""
    if argv[0] == "tea-dist":
        assert argv[1] in tea_dist_commands(), f"{where}: 'tea-dist {argv[1]}' is not a command"
        return
    if argv[0] == "celery":
        assert argv[1:3] == ["-A", "tea_dist.distributed.worker_app"], where
        import tea_dist.distributed.worker_app  # noqa: F401 - the app the command names must import

        assert argv[3] in ("worker", "flower"), where
        return
    if argv[0] == "python":
        return
    raise AssertionError(f"{where}: {argv[0]!r} is not a tea_dist entry point")


def test_compose_services_and_scaling() -> None:
    found = services()
    assert set(found) == {"redis", "flow-worker", "run-worker", "flower"}
    assert "container_name" not in found["flow-worker"]  # --scale flow-worker=4 needs this
    redis_command = " ".join(found["redis"]["command"])
    assert "requirepass" in redis_command and "--appendonly" in redis_command
    assert "FLOWER_BASIC_AUTH" in found["flower"]["environment"]
    for name, service in found.items():
        assert "healthcheck" in service, f"{name} has no health check"


def test_compose_commands_are_real_entry_points() -> None:
    for name, service in services().items():
        if name == "redis":
            continue
        check_entry_point(service["command"], f"{name}.command")
        check_entry_point(service["healthcheck"]["test"][1:], f"{name}.healthcheck")
        assert service["build"]["dockerfile"] == "workers/Dockerfile"
        assert (ROOT / service["build"]["dockerfile"]).is_file()


def test_compose_worker_roles_match_the_cli() -> None:
    found = services()
    assert found["flow-worker"]["command"][2:4] == ["--role", "flows"]
    assert found["run-worker"]["command"][2:4] == ["--role", "runs"]


def test_i3b_compose_publishes_flower_on_loopback_by_default() -> None:
    """Flower's /metrics and /healthcheck answer without auth: not on every interface."""
    flower = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["flower"]
    (port,) = flower["ports"]
    assert port.startswith("${FLOWER_BIND:-127.0.0.1}:"), port


def test_i3a_compose_gives_workers_a_warm_shutdown() -> None:
    """Compose's default 10 s would SIGKILL a flow worker in the middle of its branches."""
    found = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert found["flow-worker"]["stop_grace_period"] == "${FLOW_STOP_GRACE:-60s}"
    assert found["run-worker"]["stop_grace_period"] == "15s"
