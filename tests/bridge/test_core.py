"""The bridge's core as input → output tables: what becomes JSON, what is held back, what is refused."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest

from bmslink.bridge.core import BridgeCore, Out
from shared.bridge_config import BridgeConfig
from shared.cluster import RackState
from shared.codec import encode
from shared.config import ConfigError, validate_config
from shared.models import ProtectionFlags
from shared.topics import Topics
from tests.bridge.helpers import SITE, consolidated, controller_status, reading, view

NOW = 1_800_000_000.0
T = Topics("bmslink", SITE)


def core(**sections: Any) -> BridgeCore:
    return BridgeCore(validate_config({"site_id": SITE, **sections}, BridgeConfig, "<test>"), "9.9.9")


def feed(c: BridgeCore, topic: str, payload: bytes, mono: float = 100.0, wall: float = NOW) -> list[Out]:
    return c.on_message(topic, payload, mono, wall)


def by_topic(out: list[Out]) -> dict[str, Out]:
    return {o.topic: o for o in out}


def rack_json(out: list[Out], rack: str = "rack-01") -> dict[str, Any]:
    found = by_topic(out)[f"bmslink/{SITE}/json/rack/{rack}/state"]
    assert found.retain
    parsed: dict[str, Any] = json.loads(found.payload)
    return parsed


def with_roster(c: BridgeCore, *racks: str, mono: float = 100.0) -> list[Out]:
    return feed(c, T.cluster_state, encode(consolidated(*(view(r) for r in racks), timestamp_s=NOW)), mono)


def test_a_reading_becomes_json_with_the_controllers_verdict() -> None:
    c = core()
    assert feed(c, T.rack_telemetry("rack-01"), encode(reading("rack-01", 1, timestamp_s=NOW))) == []
    assert c.counters["before_roster"] == 1  # held until the roster is known
    out = feed(c, T.cluster_state, encode(consolidated(view("rack-01", reason="ok", ccl_a=90.0),
                                                       timestamp_s=NOW)))
    doc = rack_json(out)
    assert doc["soc_pct"] == 64.0 and doc["pack_voltage_v"] == 52.8 and doc["current_a"] == 12.5
    assert doc["power_w"] == round(52.8 * 12.5, 1)
    assert doc["cell_voltage_max_location"] == "cell 4" and doc["cell_voltage_delta_mv"] == 20.0
    assert doc["bms"] == {"charge_current_limit_a": 140.0, "discharge_current_limit_a": 200.0,
                          "charge_voltage_limit_v": 55.2, "discharge_voltage_limit_v": 46.4}
    assert doc["warnings"] == ["cell_imbalance"] and doc["alarms"] == [] and doc["alarm"] is False
    assert doc["controller"]["state"] == "ok" and doc["controller"]["charge_current_limit_a"] == 90.0
    assert doc["timestamp_s"] == NOW and doc["timestamp"].startswith("2027-01-15T08:00:00")
    assert doc["contactor"] == "closed" and doc["comm_state"] == "ok"
    bank = json.loads(by_topic(out)[f"bmslink/{SITE}/json/bank/state"].payload)
    assert bank["limits"]["charge_current_a"] == {"value": 100.0, "reason": "CCL 200 A = 2 × rack-01 100 A"}
    assert bank["eligible_racks"] == ["rack-01"] and bank["active_node"] == "ctl-a"
    assert by_topic(out)[f"bmslink/{SITE}/json/bank/state"].expiry_s == 5  # the cluster state's own expiry


def test_readings_are_held_to_the_interval_and_a_change_that_matters_goes_at_once() -> None:
    c = core(publish={"rack_interval_ms": 1000, "rack_expiry_s": 7, "bank_expiry_s": 9})
    assert by_topic(with_roster(c, "rack-01"))[f"bmslink/{SITE}/json/bank/state"].expiry_s == 9
    first = feed(c, T.rack_telemetry("rack-01"), encode(reading("rack-01", 1, timestamp_s=NOW)), mono=100.0)
    assert by_topic(first)[f"bmslink/{SITE}/json/rack/rack-01/state"].expiry_s == 7
    held = feed(c, T.rack_telemetry("rack-01"), encode(reading("rack-01", 2, timestamp_s=NOW)), mono=100.4)
    assert held == []
    assert c.tick(100.9) == []
    flushed = c.tick(101.0)
    assert json.loads(flushed[0].payload)["seq"] == 2
    alarm = feed(c, T.rack_telemetry("rack-01"), encode(reading(
        "rack-01", 3, timestamp_s=NOW, alarms=ProtectionFlags(charge_over_temperature=True))), mono=101.1)
    assert rack_json(alarm)["alarms"] == ["charge_over_temperature"]  # 0.1 s after the last: at once
    faulted = consolidated(view("rack-01", state=RackState.FAULTED, reason="alarm"), timestamp_s=NOW)
    verdict = feed(c, T.cluster_state, encode(faulted), mono=101.2)
    assert rack_json(verdict)["controller"]["state"] == "faulted"


def test_every_reading_goes_with_interval_zero() -> None:
    c = core(publish={"rack_interval_ms": 0})
    with_roster(c, "rack-01")
    for seq in (1, 2, 3):
        out = feed(c, T.rack_telemetry("rack-01"), encode(reading("rack-01", seq, timestamp_s=NOW)))
        assert rack_json(out)["seq"] == seq


@pytest.mark.parametrize(("payload", "counter"), [
    (b"\xc1\xff garbage", "rejected_malformed"),
    (msgpack.packb([1, 2, 3]), "rejected_malformed"),
    (msgpack.packb({"schema_version": [9, 0]}), "rejected_unsupported_version"),
    (msgpack.packb({"schema_version": [1, 3], "site_id": SITE}), "rejected_invalid"),
    (b"\x00" * 70_000, "rejected_oversized"),
    (encode(reading("rack-02", 1, timestamp_s=NOW)), "identity_mismatch"),
    (encode(reading("rack-01", 1, timestamp_s=NOW, site_id="elsewhere")), "identity_mismatch"),
    (encode(reading("rack-01", 1, timestamp_s=NOW + 6.0)), "future_timestamp"),
    (encode(reading("rack-01", 1, timestamp_s=NOW - 11.0)), "old_timestamp"),
])
def test_bad_input_is_counted_and_never_republished(payload: bytes, counter: str) -> None:
    c = core(checks={"max_clock_ahead_s": 5.0, "max_clock_behind_s": 10.0})
    with_roster(c, "rack-01")
    assert feed(c, T.rack_telemetry("rack-01"), payload) == []
    assert c.counters[counter] == 1
    assert c.counters["accepted"] == 0


def test_the_payload_bound_is_the_configured_one() -> None:
    c = core(checks={"max_payload_bytes": 2048})
    with_roster(c, "rack-01")
    assert feed(c, T.rack_telemetry("rack-01"), encode(reading("rack-01", 1, timestamp_s=NOW)))
    assert feed(c, T.rack_telemetry("rack-01"), b"\x00" * 2049) == []
    assert c.counters["rejected_oversized"] == 1


def test_clock_tolerances_are_the_configured_ones() -> None:
    c = core(checks={"max_clock_ahead_s": 60.0, "max_clock_behind_s": 600.0})
    with_roster(c, "rack-01")
    assert feed(c, T.rack_telemetry("rack-01"), encode(reading("rack-01", 1, timestamp_s=NOW + 30.0)))
    assert feed(c, T.rack_telemetry("rack-01"), encode(reading("rack-01", 2, timestamp_s=NOW - 500.0)),
                mono=200.0)


def test_unknown_racks_and_replays_are_counted() -> None:
    c = core()
    with_roster(c, "rack-01")
    assert feed(c, T.rack_telemetry("rack-99"), encode(reading("rack-99", 1, timestamp_s=NOW))) == []
    assert c.counters["unknown_rack"] == 1
    assert feed(c, T.rack_telemetry("rack-01"), encode(reading("rack-01", 5, timestamp_s=NOW)))
    replay = encode(reading("rack-01", 5, timestamp_s=NOW))
    assert feed(c, T.rack_telemetry("rack-01"), replay, mono=300.0) == []
    assert c.counters["out_of_order"] == 1
    restarted = reading("rack-01", 1, timestamp_s=NOW, stream_id="5eed0000000000bb")
    assert feed(c, T.rack_telemetry("rack-01"), encode(restarted), mono=400.0)  # a new agent run: heard


def test_bad_states_and_statuses_are_counted() -> None:
    c = core()
    assert feed(c, T.cluster_state, b"\x93\x01") == []
    elsewhere = consolidated(view("rack-01"), site_id="other", timestamp_s=NOW)
    assert feed(c, T.cluster_state, encode(elsewhere)) == []
    assert feed(c, T.cluster_state, encode(consolidated(view("rack-01"), timestamp_s=NOW + 60))) == []
    assert c.counters["state_rejected_malformed"] == 1
    assert c.counters["state_identity_mismatch"] == 1
    assert c.counters["state_future_timestamp"] == 1
    assert c.roster is None
    assert feed(c, T.controller_status("ctl-a"), b"not msgpack") == []
    assert feed(c, T.controller_status("ctl-a"), encode(controller_status("ctl-b"))) == []
    assert feed(c, T.rack_status("rack-01"), b"maybe") == []
    assert c.counters["controller_status_rejected_malformed"] == 1
    assert c.counters["controller_identity_mismatch"] == 1
    assert c.counters["status_unrecognised"] == 1


def test_availability_follows_the_agent_and_the_active_controller() -> None:
    c = core()
    feed(c, T.rack_status("rack-01"), b"online")
    out = by_topic(with_roster(c, "rack-01"))
    assert out[f"bmslink/{SITE}/json/rack/rack-01/availability"].payload == b"online"
    gone = feed(c, T.rack_status("rack-01"), b"offline")
    assert gone == [Out(f"bmslink/{SITE}/json/rack/rack-01/availability", b"offline", retain=True)]
    assert feed(c, T.rack_status("rack-01"), b"offline") == []  # no change, nothing sent
    bank = f"bmslink/{SITE}/json/bank/availability"
    assert feed(c, T.controller_status("ctl-b"), encode(controller_status("ctl-b", role="standby"))) == [
        Out(bank, b"offline", retain=True)]
    assert feed(c, T.controller_status("ctl-a"), encode(controller_status("ctl-a"))) == [
        Out(bank, b"online", retain=True)]
    assert feed(c, T.controller_status("ctl-a"), b"offline") == [Out(bank, b"offline", retain=True)]


def test_discovery_follows_the_roster_and_removes_left_overs() -> None:
    c = core(discovery={"prefix": "ha/disc", "expire_after_s": 0})
    node = f"ha/disc/sensor/bmslink_{SITE.replace('.', '_')}"
    stale_rack = f"{node}/rack_rack-07_soc/config"
    stale_key = f"{node}/bank_retired_entity/config"
    for topic in (stale_rack, stale_key):  # retained by an earlier run, heard before the roster
        assert feed(c, topic, b'{"name": "old"}') == []
    feed(c, f"bmslink/{SITE}/json/rack/rack-07/availability", b"online")
    out = by_topic(with_roster(c, "rack-01", "rack-02"))
    configs = {t: json.loads(o.payload) for t, o in out.items() if t.endswith("/config") and o.payload}
    assert f"{node}/rack_rack-01_soc/config" in configs and f"{node}/bank_ccl/config" in configs
    assert all(o.retain for t, o in out.items() if t.endswith("/config"))
    assert all("expire_after" not in p for p in configs.values())
    assert out[stale_rack].payload == b"" and out[stale_key].payload == b""
    assert out[f"bmslink/{SITE}/json/rack/rack-07/availability"].payload == b""
    assert out[f"bmslink/{SITE}/json/rack/rack-07/state"].payload == b""
    shrunk = by_topic(with_roster(c, "rack-01"))
    removed = {t for t, o in shrunk.items() if o.payload == b"" and t.endswith("/config")}
    assert f"{node}/rack_rack-02_soc/config" in removed
    assert not any("rack-01" in t for t in removed)
    assert shrunk[f"bmslink/{SITE}/json/rack/rack-02/state"].payload == b""
    late = feed(c, f"{node}/rack_rack-09_soc/config", b'{"name": "late"}')  # retained, heard after
    assert late == [Out(f"{node}/rack_rack-09_soc/config", b"", retain=True)]
    birth = feed(c, "ha/disc/status", b"online")
    assert len(birth) == len(configs) - len([t for t in configs if "rack-02" in t])


def test_discovery_off_and_expire_after() -> None:
    off = core(discovery={"enabled": False})
    assert not any(t.startswith("homeassistant") for t, _ in off.subscriptions())
    assert not any(o.topic.endswith("/config") for o in with_roster(off, "rack-01"))
    on = core(discovery={"expire_after_s": 45})
    configs = [json.loads(o.payload) for o in with_roster(on, "rack-01") if o.topic.endswith("/config")]
    assert configs and all(p["expire_after"] == 45 for p in configs)


def test_the_config_is_refused_where_it_cannot_work() -> None:
    with pytest.raises(ConfigError, match="needs MQTT 5"):
        validate_config({"site_id": SITE, "mqtt": {"protocol": "3.1.1"}}, BridgeConfig, "<t>")
    with pytest.raises(ConfigError, match="more than twice"):
        validate_config({"site_id": SITE, "publish": {"rack_interval_ms": 5000},
                         "discovery": {"expire_after_s": 10}}, BridgeConfig, "<t>")
    with pytest.raises(ConfigError, match="String should match pattern"):
        validate_config({"site_id": SITE, "discovery": {"prefix": "home assistant"}}, BridgeConfig, "<t>")
