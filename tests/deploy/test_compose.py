"""deploy/compose.yaml and the files it mounts: the replicas, Redis, the router, Prometheus and Grafana are there and
agree with one another (the router's upstreams and Prometheus' targets are the replica services; the dashboard's
datasource is the provisioned one), replicas are configured by known FAMSERVE_* settings only, Prometheus can scrape
them when API keys are set, compose waits out their drain on stop, and every metric the dashboard queries is one
famserve exports (or one being added, listed below)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from deploy_files import DEPLOY, FLUSH_MARGIN_S, REPO, load_yaml_documents, seconds, unknown_famserve_vars

COMPOSE = load_yaml_documents(DEPLOY / "compose.yaml")[0]
SERVICES: dict[str, Any] = COMPOSE["services"]
REPLICAS = sorted(name for name in SERVICES if re.fullmatch(r"famserve-\d+", name))
NGINX_CONF = (DEPLOY / "nginx" / "famserve.conf").read_text()
DASHBOARD = json.loads((DEPLOY / "grafana" / "dashboards" / "famserve.json").read_text())

# Metrics the dashboard shows that server/ does not export yet (none: issue 5 exported the last ones). List a name
# here only while it is being built; test_dashboard_metrics_are_exported_or_pending keeps dashboard and server in step.
PENDING_METRICS: frozenset[str] = frozenset()
_SAMPLE_SUFFIXES = ("_bucket", "_count", "_sum")
_PROMQL_WORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
    "inf", "nan"})


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, label names or
    template variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, regexes)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery windows
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", expr)  # label lists
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", expr):
        if match.group(2) is None and match.group(1) not in _PROMQL_WORDS:
            names.add(match.group(1))
    return names


def dashboard_exprs() -> list[str]:
    """The PromQL of every panel, and of every template variable (label_values(SELECTOR, label) -> SELECTOR)."""
    exprs = [target["expr"] for panel in DASHBOARD["panels"] for target in panel.get("targets", [])]
    for variable in DASHBOARD["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            label_values = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            exprs.append(label_values.group(1) if label_values else query)
    return exprs


def exported_metric_names() -> set[str]:
    """Metric family names the server declares (string literals in server/, where metrics.py defines them)."""
    names: set[str] = set()
    for path in (REPO / "server").rglob("*.py"):
        names |= set(re.findall(r"""["'](famserve_[a-z0-9_]+)["']""", path.read_text()))
    return names


def test_services_exist() -> None:
    assert {"redis", "router", "prometheus", "grafana"} <= set(SERVICES)
    assert len(REPLICAS) >= 2


@pytest.mark.parametrize("replica", REPLICAS)
def test_replica_is_configured_by_known_famserve_settings(replica: str) -> None:
    env = _environment(SERVICES[replica])
    assert env, f"{replica} sets no environment"
    assert unknown_famserve_vars(list(env)) == []
    assert env["FAMSERVE_SESSION_STORE"] == "redis://redis:6379/0"
    assert "command" not in SERVICES[replica] and "entrypoint" not in SERVICES[replica]  # configuration by env only


@pytest.mark.parametrize("replica", REPLICAS)
def test_stop_grace_period_covers_the_drain(replica: str) -> None:
    """compose sends SIGKILL after stop_grace_period: the drain and the session flush must fit before it."""
    env = _environment(SERVICES[replica])
    drain_s = float(env["FAMSERVE_SHUTDOWN_GRACE_S"])
    assert seconds(SERVICES[replica]["stop_grace_period"]) >= drain_s + FLUSH_MARGIN_S


@pytest.mark.parametrize("replica", REPLICAS)
def test_prometheus_can_scrape_a_replica_with_api_keys(replica: str) -> None:
    """With FAMSERVE_API_KEYS set, /metrics needs a key unless the replica opens it: one or the other."""
    job = _prometheus_job()
    opens_metrics = _environment(SERVICES[replica]).get("FAMSERVE_METRICS_OPEN") == "true"
    assert opens_metrics != ("authorization" in job), "open /metrics on the replicas or give Prometheus a key"
    assert "${FAMSERVE_API_KEYS" in SERVICES[replica]["environment"]["FAMSERVE_API_KEYS"]


@pytest.mark.parametrize("replica", REPLICAS)
def test_replica_healthcheck_waits_for_readiness(replica: str) -> None:
    service = SERVICES[replica]
    assert "/ready" in " ".join(service["healthcheck"]["test"])
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert SERVICES["router"]["depends_on"][replica]["condition"] == "service_healthy"


def test_replicas_have_their_own_state_volume() -> None:
    mounts = {replica: [volume for volume in SERVICES[replica]["volumes"] if volume.endswith(":/var/lib/famserve")]
              for replica in REPLICAS}
    assert all(len(found) == 1 for found in mounts.values()), mounts
    names = [found[0].split(":")[0] for found in mounts.values()]
    assert len(set(names)) == len(names)
    assert set(names) <= set(COMPOSE["volumes"])


def test_redis_is_durable() -> None:
    redis = SERVICES["redis"]
    command = redis["command"]
    pairs = dict(zip(command[1::2], command[2::2]))
    assert command[0] == "redis-server"
    assert pairs["--appendonly"] == "yes"
    assert pairs["--appendfsync"] == "always"
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert "redis-cli" in redis["healthcheck"]["test"]


def test_bind_mounted_files_exist() -> None:
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is not in deploy/"


def test_router_hashes_the_session_id_consistently() -> None:
    assert any(volume.startswith("./nginx/famserve.conf:") for volume in SERVICES["router"]["volumes"])
    assert re.search(r"^\s*hash \$session_key consistent;", NGINX_CONF, re.MULTILINE)
    assert re.search(r"^map \$uri \$session_key \{", NGINX_CONF, re.MULTILINE)


def test_router_upstreams_are_the_replicas() -> None:
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)\b", NGINX_CONF, re.MULTILINE)
    assert sorted(servers) == [(replica, "8000") for replica in REPLICAS]


def _prometheus_job() -> dict[str, Any]:
    config = load_yaml_documents(DEPLOY / "prometheus" / "prometheus.yml")[0]
    return next(job for job in config["scrape_configs"] if job["job_name"] == "famserve")


def test_prometheus_scrapes_every_replica() -> None:
    job = _prometheus_job()
    targets = [target for static in job["static_configs"] for target in static["targets"]]
    assert sorted(targets) == [f"{replica}:8000" for replica in REPLICAS]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert any(volume.endswith(":/etc/prometheus/prometheus.yml:ro") for volume in SERVICES["prometheus"]["volumes"])


def test_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasource = load_yaml_documents(provisioning / "datasources" / "prometheus.yaml")[0]["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    provider = load_yaml_documents(provisioning / "dashboards" / "famserve.yaml")[0]["providers"][0]
    mounts = dict(volume.split(":")[:2] for volume in SERVICES["grafana"]["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    used = {panel["datasource"]["uid"] for panel in DASHBOARD["panels"] if "datasource" in panel}
    assert used == {datasource["uid"]}


def test_dashboard_panels_are_well_formed() -> None:
    panels = DASHBOARD["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"] and all(target["expr"] for target in panel["targets"]), panel["title"]


@pytest.mark.parametrize("expr", dashboard_exprs())
def test_dashboard_metric_names_follow_prometheus_conventions(expr: str) -> None:
    names = promql_metric_names(expr)
    assert names, f"no metric found in {expr!r}"
    for name in names:
        assert name.startswith("famserve_"), name
        assert ":" not in name, name  # colons are for recording rules


def test_dashboard_metrics_are_exported_or_pending() -> None:
    used = {re.sub("(" + "|".join(_SAMPLE_SUFFIXES) + ")$", "", name)
            for expr in dashboard_exprs() for name in promql_metric_names(expr)}
    assert used - exported_metric_names() - PENDING_METRICS == set()


def test_dashboard_shows_the_core_metrics() -> None:
    used = {name for expr in dashboard_exprs() for name in promql_metric_names(expr)}
    assert {
        "famserve_requests_total", "famserve_request_duration_seconds_bucket",
        "famserve_time_to_first_token_seconds_bucket", "famserve_inter_token_latency_seconds_bucket",
        "famserve_prompt_tokens_total", "famserve_generation_tokens_total",
        "famserve_num_requests_waiting", "famserve_num_requests_running",
        "famserve_states_resident_bytes", "famserve_fam_updates_total",
    } <= used


@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (route, status) (rate(famserve_requests_total{instance=~"$instance"}[$__rate_interval]))',
     {"famserve_requests_total"}),
    ("histogram_quantile(0.99, sum by (le) (rate(famserve_x_seconds_bucket[5m])))", {"famserve_x_seconds_bucket"}),
    ("famserve_a / ignoring(instance) famserve_b", {"famserve_a", "famserve_b"}),
    ("vllm:num_requests_waiting", {"vllm:num_requests_waiting"}),
])
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names
