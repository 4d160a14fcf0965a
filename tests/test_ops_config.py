"""docker-compose.yml, the Prometheus config and the Grafana dashboard hold together, without a Docker engine:
mounted paths exist, Prometheus scrapes the service and port the server listens on, and every metric the
dashboard plots is one the server really exports."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "tokenmill.json"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _bind_mounts(service: dict) -> list[tuple[str, str]]:
    mounts = []
    for volume in service.get("volumes", []):
        host, container = volume.split(":")[:2]
        if host.startswith("."):
            mounts.append((host, container))
    return mounts


def _container_path(compose: dict, service: str, inside: str) -> Path:
    """The repo file that a path inside a service's container comes from, through its bind mounts."""
    for host, container in _bind_mounts(compose["services"][service]):
        if inside == container or inside.startswith(container.rstrip("/") + "/"):
            return ROOT / host / inside[len(container):].lstrip("/")
    raise AssertionError(f"{inside} is not mounted into {service}")


def test_every_service_has_an_image_or_build_and_its_mounts_exist(compose):
    services = compose["services"]
    assert {"tokenmill", "prometheus", "grafana", "locust"} <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for host, _ in _bind_mounts(service):
            assert (ROOT / host).exists(), f"{name} mounts {host}, which is not in the repo"
    dockerfile = (ROOT / services["tokenmill"]["build"] / "Dockerfile").read_text()
    import tomllib
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for package in (p.rstrip("*") for p in packages["include"]):  # the image installs them all
        assert f"COPY {package}/ {package}/" in dockerfile, package
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"


def test_server_listens_where_its_port_healthcheck_and_scrape_target_say(compose):
    tokenmill = compose["services"]["tokenmill"]
    command = tokenmill["command"]
    port = command[command.index("--port") + 1]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert f"{port}:{port}" in tokenmill["ports"]
    assert f"127.0.0.1:{port}/health" in " ".join(tokenmill["healthcheck"]["test"])
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"EXPOSE {port}" in dockerfile and f"--port\", \"{port}\"" in dockerfile
    prometheus = yaml.safe_load(_container_path(compose, "prometheus", "/etc/prometheus/prometheus.yml").read_text())
    jobs = prometheus["scrape_configs"]
    assert [t for job in jobs for c in job["static_configs"] for t in c["targets"]] == [f"tokenmill:{port}"]
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in jobs)
    locust = compose["services"]["locust"]
    assert f"http://tokenmill:{port}" in locust["command"]
    locustfile = locust["command"][locust["command"].index("-f") + 1]
    assert _container_path(compose, "locust", locustfile).is_file()


def test_grafana_provisioning_finds_the_datasource_and_the_dashboard(compose):
    provisioning = _container_path(compose, "grafana", "/etc/grafana/provisioning")
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasources[0]["type"] == "prometheus" and datasources[0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((provisioning / "dashboards" / "tokenmill.yml").read_text())["providers"]
    folder = _container_path(compose, "grafana", providers[0]["options"]["path"])
    assert (folder / DASHBOARD.name).resolve() == DASHBOARD.resolve()
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    uids |= {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {datasources[0]["uid"]}


_SERIES_SUFFIXES = {"gauge": ("",), "counter": ("_total", "_created"),
                    "histogram": ("_bucket", "_sum", "_count", "_created")}


def _exported_series() -> set[str]:
    """The series names the server's /metrics can hold. Taken from each family's type rather than from the samples:
    a labelled counter with no child yet (request_success before a request finishes) renders no sample."""
    metrics = Metrics("x")
    text = metrics.render().decode()
    series = {family.name + suffix for family in text_string_to_metric_families(text)
              for suffix in _SERIES_SUFFIXES.get(family.type, ("",))}
    metrics.request_finished("stop")
    samples = {s.name for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}
    assert samples <= series and "tokenmill:request_success_total" in samples
    return series


def test_every_dashboard_metric_is_exported_by_the_server():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exported = _exported_series()
    used = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = re.findall(r"tokenmill:[a-zA-Z_:][a-zA-Z0-9_:]*", target["expr"])
            assert names, target["expr"]
            assert target["expr"].count("(") == target["expr"].count(")")
            for name in names:
                assert name in exported, f"panel {panel['title']!r} plots {name}, which the server does not export"
            used.update(names)
    titles = " ".join(p["title"] for p in panels).lower()
    for topic in ("first token", "inter-token", "throughput", "running", "kv cache", "preemption"):
        assert topic in titles
    assert {"tokenmill:time_to_first_token_seconds_bucket", "tokenmill:kv_cache_usage_perc"} <= used


def test_compose_client_accepts_the_file():
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) and subprocess.run([*cmd, "version"], capture_output=True).returncode == 0:
            run = subprocess.run([*cmd, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True)
            assert run.returncode == 0, run.stderr
            return
    pytest.skip("no docker compose client on this machine; the structural checks above still ran")


def test_promtool_accepts_the_prometheus_config_and_the_dashboard_queries(tmp_path):
    if not shutil.which("promtool"):
        pytest.skip("promtool is not installed; the scrape target and the metric names were checked above")
    run = subprocess.run(["promtool", "check", "config", str(ROOT / "ops" / "prometheus" / "prometheus.yml")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    # promtool parses PromQL only in rule files: each dashboard query becomes a recording rule
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": e}
                                                         for i, e in enumerate(exprs)]}]}
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    run = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
