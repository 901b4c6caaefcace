"""The controller's metrics through its real HTTP endpoint, one test per family group: each rack's
admitted telemetry and the limits its BMS reports, what the cycle made of it (state enum, derated
limits, share, maintenance), the bank's limits as separate metrics with their units, the bank as
computed, role and links, and the counters split by meaning (cycles, frame sets, payloads, errors)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from shared.codec import encode
from shared.mqtt import MqttSession
from shared.topics import Topics
from tests.agent.helpers import wait_until
from tests.contract.samples import telemetry
from tests.fixtures.broker import MosquittoBroker
from tests.test_metrics_site import RACK, metrics_site, scrape

C = "bmslink_controller"


async def test_each_rack_shows_its_admitted_telemetry_and_what_the_cycle_made_of_it(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str
) -> None:
    async with metrics_site(mqtt_broker, unique_topic_prefix) as site:
        got = await scrape(site.controller_port)
        latest = site.controller.table.latest(RACK)
        assert latest is not None and latest.telemetry is not None and latest.telemetry.measurements
        m = latest.telemetry.measurements
        assert got.value(f"{C}_rack_soh_ratio", rack=RACK) == pytest.approx(0.98)
        assert got.value(f"{C}_rack_soc_ratio", rack=RACK) == pytest.approx(m.soc_pct / 100, abs=0.01)
        assert got.value(f"{C}_rack_current_amperes", rack=RACK) == pytest.approx(20.0)
        assert got.value(f"{C}_rack_voltage_volts", rack=RACK) == pytest.approx(m.pack_voltage_v, abs=0.2)
        for name, field in (("temperature_max_celsius", m.temperature_max_c),
                            ("temperature_min_celsius", m.temperature_min_c),
                            ("cell_voltage_max_volts", m.cell_voltage_max_v),
                            ("cell_voltage_min_volts", m.cell_voltage_min_v)):
            assert got.value(f"{C}_rack_{name}", rack=RACK) == pytest.approx(field, abs=0.5), name
        assert got.value(f"{C}_rack_bms_charge_current_limit_amperes", rack=RACK) == pytest.approx(140.0)
        assert got.value(f"{C}_rack_bms_discharge_current_limit_amperes", rack=RACK) == pytest.approx(140.0)
        assert got.value(f"{C}_rack_bms_charge_voltage_limit_volts", rack=RACK) == pytest.approx(55.2)
        assert got.value(f"{C}_rack_bms_discharge_voltage_limit_volts", rack=RACK) == pytest.approx(46.4)
        stamp = got.value(f"{C}_rack_telemetry_timestamp_seconds", rack=RACK)
        assert abs(time.time() - stamp) < 5.0
        # What the cycle made of it: ok, counted in full, its limits entering the policy as reported.
        assert got.enum(f"{C}_rack_state", "state", rack=RACK) == "ok"
        assert len(got.series(f"{C}_rack_state", rack=RACK)) == 6  # every state, 0 but the current one
        assert got.value(f"{C}_rack_eligible", rack=RACK) == 1.0
        assert got.value(f"{C}_rack_share_ratio", rack=RACK) == 1.0
        assert got.value(f"{C}_rack_maintenance", rack=RACK) == 0.0
        assert got.value(f"{C}_rack_derated_charge_current_limit_amperes", rack=RACK) == pytest.approx(140.0)
        derated_dcl = got.value(f"{C}_rack_derated_discharge_current_limit_amperes", rack=RACK)
        assert derated_dcl == pytest.approx(140.0)


async def test_bank_limits_are_separate_metrics_with_their_units_and_follow_maintenance(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str
) -> None:
    async with metrics_site(mqtt_broker, unique_topic_prefix) as site:
        got = await scrape(site.controller_port)
        sent = site.controller.last_sent
        assert sent is not None
        assert got.value(f"{C}_charge_current_limit_amperes") == pytest.approx(sent.charge_current_limit_a)
        dcl = got.value(f"{C}_discharge_current_limit_amperes")
        assert dcl == pytest.approx(sent.discharge_current_limit_a)
        assert got.value(f"{C}_charge_voltage_limit_volts") == pytest.approx(55.2)
        assert got.value(f"{C}_discharge_voltage_limit_volts") == pytest.approx(46.4)
        assert got.value(f"{C}_charge_enabled") == 1.0 and got.value(f"{C}_discharge_enabled") == 1.0
        assert got.value(f"{C}_force_charge_request") == 0.0
        assert got.value(f"{C}_eligible_racks") == 1.0 and got.value(f"{C}_roster_racks") == 1.0
        assert got.value(f"{C}_bank_soh_ratio") == pytest.approx(0.98)
        assert got.value(f"{C}_bank_current_amperes") == pytest.approx(20.0)
        assert got.value(f"{C}_cluster_flag", flag="not_enough_racks") == 0.0
        assert got.value(f"{C}_bank_alarm", flag="cell_over_voltage") == 0.0
        assert got.enum(f"{C}_role", "role") == "active"
        assert {labels["role"] for labels, _ in got.series(f"{C}_role")} == {"active", "standby", "fenced"}
        assert got.value(f"{C}_link_up", link="mqtt") == 1.0 and got.value(f"{C}_link_up", link="can") == 1.0

        report = site.controller.set_maintenance([RACK], True, "metrics test")
        assert report is not None
        got = await scrape(site.controller_port)
        assert got.value(f"{C}_rack_maintenance", rack=RACK) == 1.0
        assert got.value(f"{C}_rack_eligible", rack=RACK) == 0.0
        assert got.value(f"{C}_eligible_racks") == 0.0
        assert got.value(f"{C}_cluster_flag", flag="not_enough_racks") == 1.0
        assert got.value(f"{C}_charge_current_limit_amperes") == 0.0
        assert got.value(f"{C}_discharge_current_limit_amperes") == 0.0


async def test_counters_are_split_by_meaning(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with metrics_site(mqtt_broker, unique_topic_prefix) as site:
        first = await scrape(site.controller_port)
        pub = MqttSession(site.controller.config.mqtt.model_copy(update={"client_id": None}), "metrics-pub")
        await pub.start()
        try:
            assert await pub.wait_connected(5)
            topics = Topics(unique_topic_prefix, "site-t")
            pub.publish(topics.rack_telemetry(RACK), b"\x00garbage")
            stranger = telemetry(rack_id="rack-77", site_id="site-t")
            pub.publish(topics.rack_telemetry("rack-77"), encode(stranger))
            await wait_until(lambda: site.controller.table.counters["unknown_rack"] >= 1, 3, "the stranger")
            await wait_until(lambda: site.controller.table.counters["accepted"]
                             > first.value(f"{C}_telemetry_payloads_total", outcome="accepted"), 3, "more")
        finally:
            await pub.stop()
        got = await scrape(site.controller_port)
        assert got.value(f"{C}_cycles_total") > first.value(f"{C}_cycles_total")
        assert got.value(f"{C}_frame_sets_sent_total", trigger="heartbeat") >= 1
        assert {labels["trigger"] for labels, _ in got.series(f"{C}_frame_sets_sent_total")} == {
            "heartbeat", "urgent", "answer"}
        assert got.value(f"{C}_frame_sets_refused_total") == 0.0  # the active may transmit
        assert got.value(f"{C}_can_sends_total", kind="sets") >= 1
        assert got.value(f"{C}_can_frames_sent_total") > got.value(f"{C}_can_sends_total", kind="sets")
        assert got.value(f"{C}_can_bus_opens_total") == 1.0
        assert got.value(f"{C}_telemetry_payloads_total", outcome="rejected_malformed") == 1.0
        assert got.value(f"{C}_unknown_rack_payloads_total", rack="rack-77") == 1.0
        assert got.value(f"{C}_mqtt_messages_received_total") >= 3
        # Every error kind is there from the start, at 0 when nothing failed.
        kinds = {labels["kind"]: value for labels, value in got.series(f"{C}_errors_total")}
        assert {"cycle", "failsafe", "can_send", "can_open", "mqtt_connect", "state_write"} <= set(kinds)
        assert kinds["cycle"] == 0.0 and kinds["can_send"] == 0.0
        # Nothing lumps them together any more.
        for lumped in (f"{C}_events_total", f"{C}_can_total", f"{C}_mqtt_total", f"{C}_telemetry_total"):
            assert lumped not in got.samples

        # A defect in the core: counted as a cycle error (the fail-safe set goes out), not as a cycle.
        engine = site.controller.engine
        real_cycle = engine.cycle
        failures = 0

        def failing_twice(*args: Any, **kwargs: Any) -> Any:
            nonlocal failures
            if failures < 2:
                failures += 1
                raise RuntimeError("injected core defect")
            return real_cycle(*args, **kwargs)

        monkeypatch.setattr(engine, "cycle", failing_twice)
        await wait_until(lambda: failures == 2, 3, "the injected defects")
        got = await scrape(site.controller_port)
        assert got.value(f"{C}_errors_total", kind="cycle") == 2.0
        assert got.value(f"{C}_errors_total", kind="failsafe") == 0.0


# Every family the controller exposes, with the value an idle, healthy single controller with one rack
# shows (None: any value). A family added without a row here, or one that disappears, fails the test.
IDLE_FAMILIES: dict[str, float | None] = {
    f"{C}_cycles_total": None, f"{C}_frame_sets_resumed_total": 0.0, f"{C}_frame_sets_refused_total": 0.0,
    f"{C}_heartbeats_sent_total": 0.0, f"{C}_heartbeat_deadlines_skipped_total": 0.0,
    f"{C}_telemetry_new_streams_total": 0.0, f"{C}_can_frames_sent_total": None,
    f"{C}_can_frames_received_total": 0.0, f"{C}_can_frames_dropped_total": 0.0,
    f"{C}_can_error_frames_total": 0.0, f"{C}_can_bus_opens_total": 1.0, f"{C}_can_bus_drops_total": 0.0,
    f"{C}_can_bad_heartbeats_total": 0.0, f"{C}_foreign_limits_frames_total": 0.0,
    f"{C}_inverter_requests_unanswered_total": 0.0, f"{C}_inverter_answers_failsafe_total": 0.0,
    f"{C}_frame_values_clamped_total": 0.0, f"{C}_mqtt_connects_total": 1.0,
    f"{C}_mqtt_disconnects_total": 0.0, f"{C}_mqtt_messages_received_total": None,
    f"{C}_mqtt_messages_published_total": None, f"{C}_mqtt_publish_dropped_total": None,
    f"{C}_mqtt_receive_dropped_total": 0.0, f"{C}_foreign_transmitter": 0.0,
    f"{C}_foreign_transmitter_detections_total": 0.0, f"{C}_bank_temperature_max_celsius": None,
    f"{C}_bank_temperature_min_celsius": None, f"{C}_bank_cell_voltage_max_volts": None,
    f"{C}_bank_cell_voltage_min_volts": None, f"{C}_bank_voltage_volts": None,
}
IDLE_LABELLED: dict[str, tuple[str, set[str]]] = {
    f"{C}_can_sends_total": ("kind", {"sets", "answers", "equipment_answers", "heartbeats"}),
    f"{C}_can_bus_events_total": ("event", {"bus_off", "no_ack", "error_passive", "restarted"}),
    f"{C}_inverter_requests_total": ("kind", {"ensemble", "equipment", "unsupported"}),
    f"{C}_journal_entries_total": ("outcome", {"recorded", "suppressed"}),
    f"{C}_bank_warning": ("flag", {"cell_over_voltage", "insulation_fault"}),
    f"{C}_link_up": ("link", {"mqtt", "can"}),
}


async def test_every_family_is_exposed_from_the_first_scrape(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str
) -> None:
    async with metrics_site(mqtt_broker, unique_topic_prefix) as site:
        got = await scrape(site.controller_port)
    for name, expected in IDLE_FAMILIES.items():
        value = got.value(name)
        assert expected is None or value == expected, (name, value)
    for name, (label, values) in IDLE_LABELLED.items():
        assert values <= {labels[label] for labels, _ in got.series(name)}, name
    # Every key the CAN port counted has a family of its own (one without would show up here).
    assert got.series(f"{C}_can_other_events_total") == []
