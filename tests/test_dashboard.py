"""Issue 14: the monitoring profile's Grafana dashboard shows metrics tea_dist really exports.

The dashboard is a Grafana dashboard model loaded by file provisioning; every panel query and
variable names only metrics the code defines, and every metric the code defines is on it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from tea_dist.distributed.settings import Settings
from tea_dist.distributed.worker import QueueDepth
from tea_dist.observe import metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tea_dist.json"
METRIC = re.compile(r"\btea_dist_[a-z0-9_]+")


def exported() -> dict[str, set[str]]:
    """Every metric family the code exports -> the sample names Prometheus stores for it."""
    registry = CollectorRegistry()
    metrics.build(registry)
    registry.register(QueueDepth(Settings(), ["tea.flows"]))
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {
        family.name: {family.name + s for s in suffixes[family.type]}
        for family in registry.collect()
    }


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def queries(model: dict[str, Any]) -> list[tuple[str, str]]:
    found = [(p["title"], t["expr"]) for p in model["panels"] for t in p["targets"]]
    found += [(v["name"], v["definition"]) for v in model["templating"]["list"]]
    return found


def test_i14_dashboard_is_a_grafana_dashboard_model() -> None:
    model = dashboard()
    assert model["uid"] and model["title"] and isinstance(model["schemaVersion"], int)
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert datasource["apiVersion"] == 1
    (source,) = datasource["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))
    for panel in model["panels"]:
        assert panel["type"] in ("timeseries", "state-timeline"), panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["refId"] and target["expr"], panel["title"]


def test_i14_every_panel_query_names_an_exported_metric() -> None:
    samples = set().union(*exported().values())
    for where, expr in queries(dashboard()):
        names = METRIC.findall(expr)
        assert names, f"{where}: {expr} names no tea_dist metric"
        unknown = set(names) - samples
        assert not unknown, f"{where}: {sorted(unknown)} are not exported by tea_dist"


def test_i14_every_exported_metric_is_on_the_dashboard() -> None:
    shown = {name for _, expr in queries(dashboard()) for name in METRIC.findall(expr)}
    missing = [family for family, names in exported().items() if not names & shown]
    assert not missing


def test_i14_monitoring_profile_provisions_the_dashboard_and_scrapes_the_workers() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "deploy/monitoring.yml" in compose["include"]
    monitoring = yaml.safe_load((DEPLOY / "monitoring.yml").read_text())["services"]
    assert {n: s["profiles"] for n, s in monitoring.items()} == {
        "prometheus": ["monitoring"],
        "grafana": ["monitoring"],
    }
    mounts = {v.split(":")[1]: DEPLOY / v.split(":")[0] for v in monitoring["grafana"]["volumes"]}
    provider = yaml.safe_load(
        (mounts["/etc/grafana/provisioning"] / "dashboards/tea_dist.yml").read_text()
    )
    assert provider["apiVersion"] == 1
    (files,) = provider["providers"]
    assert (mounts[files["options"]["path"]] / DASHBOARD.name).is_file()

    (config,) = [v.split(":")[0] for v in monitoring["prometheus"]["volumes"]]
    scrape = yaml.safe_load((DEPLOY / config).read_text())["scrape_configs"]
    (workers,) = [job for job in scrape if job["job_name"] == "tea_dist_workers"]
    (discovery,) = workers["dns_sd_configs"]
    for service in ("flow-worker", "run-worker"):
        assert service in discovery["names"]
        command = compose["services"][service]["command"]
        port = command[command.index("--metrics-port") + 1]
        assert int(port) == discovery["port"]


def test_i14_readme_lists_every_exported_metric() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Monitoring") :]
    section = section[: section.index("\n## ", 1)]
    for family, names in exported().items():
        assert family in section or names & set(METRIC.findall(section)), family
