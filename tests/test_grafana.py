"""The Grafana dashboard, deploy/grafana/bmslink.json: well-formed for import, and every metric name its
PromQL uses is in the real exposition of a running agent and controller (a site of real parts,
tests/test_metrics_site.py) — so a renamed metric breaks this test, not an operator's dashboard.

PromQL is not parsed in full here; :func:`metric_names` is a tokenizer that knows what is *not* a
metric name: string literals, durations and Grafana variables inside ``[...]``, label matchers inside
``{...}``, the label lists of ``by``/``without``/``on``/``ignoring``/``group_left``/``group_right``,
``offset`` durations, function and aggregation names (an identifier followed by ``(``), keywords and
numbers. It checks the
expression's delimiters balance and its range selectors are durations or Grafana's interval variables.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from shared.codec import encode
from shared.mqtt import MqttSession
from shared.topics import Topics
from tests.agent.helpers import wait_until
from tests.contract.samples import telemetry
from tests.fixtures.broker import MosquittoBroker
from tests.test_metrics_site import metrics_site, scrape

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "bmslink.json"

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_RANGE = re.compile(r"\[([^\[\]]*)\]")
_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$|^\$__(rate_interval|interval|range)$|^\$\w+$")
_SUBQUERY = re.compile(r"^\s*(\S+)\s*:\s*(\S*)\s*$")
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
                       "and", "or", "unless", "atan2", "inf", "nan", "Inf", "NaN"})


class PromQLError(ValueError):
    def __init__(self, expr: str, problem: str) -> None:
        super().__init__(f"{problem}: {expr}")
        self.expr = expr
        self.problem = problem


def _balanced(expr: str) -> None:
    closing = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for char in expr:
        if char in "([{":
            stack.append(char)
        elif char in closing and (not stack or stack.pop() != closing[char]):
            raise PromQLError(expr, f"unbalanced {char!r}")
    if stack:
        raise PromQLError(expr, f"unclosed {stack[-1]!r}")


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects (a ValueError for one that does not tokenize as PromQL)."""
    text = _STRING.sub('""', expr)  # label values and regexes, Grafana variables in them included
    _balanced(text)
    for inside in _RANGE.findall(text):
        parts = _SUBQUERY.match(inside)
        durations = [parts.group(1), *filter(None, [parts.group(2)])] if parts else [inside.strip()]
        for duration in durations:
            if not _DURATION.match(duration):
                raise PromQLError(expr, f"not a duration in a range selector: [{inside}]")
    text = _RANGE.sub(" ", text)
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = _LABEL_LIST.sub(" ", text)
    text = re.sub(r"\boffset\s+-?(\d+(ms|s|m|h|d|w|y))+", " ", text)  # a duration outside brackets
    text = re.sub(r"\b\d+(\.\d+)?([eE][+-]?\d+)?\b", " ", text)  # numbers
    if "$" in text:
        raise PromQLError(expr, "a Grafana variable outside a label matcher or a range")
    names = set()
    for match in _IDENT.finditer(text):
        word = match.group()
        follows = text[match.end():].lstrip()[:1]
        if follows == "(" or word in _KEYWORDS:
            continue  # a function or aggregation, or a keyword
        names.add(word)
    return names


@pytest.mark.parametrize(("expr", "names"), [
    ("rate(x_total[5m])", {"x_total"}),
    ('sum by (rack, le) (rate(h_bucket{job=~"$job",a!="b"}[$__rate_interval]))', {"h_bucket"}),
    ("histogram_quantile(0.99, sum(rate(h_bucket[5m])) by (le))", {"h_bucket"}),
    ("a * on (instance, job) group_left (component) b", {"a", "b"}),
    ('x{role="active"} == 1 and on (instance) y > bool 0.5', {"x", "y"}),
    ("time() - max by (rack) (t_seconds)", {"t_seconds"}),
    ('label_replace(m, "dst", "$1", "src", "(.*)")', {"m"}),
    ("max_over_time(g[1h:30s]) offset 5m", {"g"}),
    ("increase(c_total[1h]) * 60", {"c_total"}),
])
def test_the_tokenizer_finds_metric_names_and_nothing_else(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


@pytest.mark.parametrize("bad", ["rate(x_total[5m]", "sum(x))", "rate(x[five])", "x{a=\"b\"]", "x * $scale"])
def test_the_tokenizer_refuses_what_is_not_promql(bad: str) -> None:
    with pytest.raises(PromQLError):
        metric_names(bad)


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def targets() -> list[tuple[str, str]]:
    """(panel title, expression) of every query, the template variables' included."""
    found = [(panel["title"], target["expr"]) for panel in dashboard()["panels"]
             for target in panel.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        query = variable["query"]["query"]
        inner = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query)
        assert inner, query
        found.append((f"variable {variable['name']}", inner.group(1)))
    return found


def test_the_dashboard_is_importable_and_covers_what_operators_asked_for() -> None:
    d = dashboard()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    assert [i["name"] for i in d["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [panel["id"] for panel in d["panels"]]
    assert len(ids) == len(set(ids))
    for panel in d["panels"]:
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid) and grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)) and all(t["expr"].strip() for t in panel["targets"])
    used = set().union(*(metric_names(expr) for _, expr in targets()))
    for wanted in ("bmslink_controller_charge_current_limit_amperes", "bmslink_controller_rack_soc_ratio",
                   "bmslink_controller_rack_temperature_max_celsius",
                   "bmslink_controller_rack_derated_charge_current_limit_amperes",
                   "bmslink_controller_rack_state", "bmslink_controller_role",
                   "bmslink_controller_commands_total", "bmslink_controller_journal_entries_total",
                   "process_cpu_seconds_total", "process_resident_memory_bytes"):
        assert wanted in used, wanted


async def test_every_metric_the_dashboard_uses_is_exposed_by_a_running_site(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str
) -> None:
    async with metrics_site(mqtt_broker, unique_topic_prefix) as site:
        # A command (refused: it is not signed), so the commands family has a series.
        pub = MqttSession(site.controller.config.mqtt, "grafana-test-operator")
        await pub.start()
        try:
            assert await pub.wait_connected(5)
            topics = Topics(unique_topic_prefix, "site-t")
            pub.publish(topics.command_request, b"not a command", qos=1)
            stranger = telemetry(rack_id="rack-99", site_id="site-t")
            pub.publish(topics.rack_telemetry("rack-99"), encode(stranger))
            await wait_until(lambda: bool(site.controller.command_outcomes), 5, "the command refused")
            await wait_until(lambda: bool(site.controller.unknown_racks), 5, "the unknown rack counted")
        finally:
            await pub.stop()
        exposed: set[str] = set()
        for port in (site.agent_port, site.controller_port):
            exposed |= set((await scrape(port)).samples)
    missing = {(title, name) for title, expr in targets() for name in metric_names(expr)
               if name not in exposed}
    assert not missing, sorted(missing)
