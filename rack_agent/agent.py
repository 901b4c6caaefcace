"""The rack agent: poll the rack's BMS units on a fixed-rate schedule and publish telemetry.

Units on the same link are polled in turn; links are polled concurrently.
The broker being away never stops polling: telemetry is published with QoS 0
and a Message Expiry, so nothing stale is delivered late, and the latest state
goes out the moment the connection returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from rack_agent.errors import PollError, ProfileError
from rack_agent.links import BmsLink, make_link
from rack_agent.merge import merge_units, without_current_permission
from rack_agent.metrics import AgentMetrics
from rack_agent.profiles import SunSpecProfile, load_profile
from rack_agent.profiles.pylontech import PylontechProfile, link_mismatch
from rack_agent.schedule import FixedRateSchedule
from rack_agent.serial_access import serial_access_warnings
from rack_agent.unit import UnitRuntime
from rack_agent.wire_budget import budget_warnings
from shared.agent_config import AgentConfig
from shared.codec import encode
from shared.logthrottle import ThrottledLog
from shared.models import RackCommState, RackTelemetry
from shared.mqtt import MqttSession, Will
from shared.sd_notify import LoopWatchdog, Notifier
from shared.topics import STATUS_OFFLINE, STATUS_ONLINE, Topics

log = logging.getLogger(__name__)

# Links start spread over this fraction of the poll interval (the rest is left for the slowest link).
STAGGER_FRACTION = 0.5


def load_unit_profiles(config: AgentConfig) -> dict[str, UnitRuntime]:
    """Resolve every unit's profile; raises :class:`ProfileError` on the first bad one."""
    units: dict[str, UnitRuntime] = {}
    for unit in config.units:
        link = config.link(unit.link)
        profile = None
        if link.type != "can":
            try:
                profile = load_profile(unit.profile)
            except ProfileError as exc:
                raise ProfileError(f"units.{unit.name}.profile = {unit.profile!r}", exc.problems) from exc
            mismatch = link_mismatch(profile, unit.profile, link.name, link.type)
            if mismatch is not None:
                raise ProfileError(f"units.{unit.name}.profile = {unit.profile!r}", [mismatch])
        units[unit.name] = UnitRuntime.create(unit, profile, config.polling, config.plausibility)
    return units


def line_warnings(config: AgentConfig, units: dict[str, UnitRuntime]) -> list[str]:
    """What an installer must fix on the serial lines (devices this user cannot open, a poll that
    needs more wire time than the interval): said at start and by --check-config, never fatal."""
    # The budget times Modbus RTU lines; a Pylontech profile never reads one (load_unit_profiles).
    profiles = {name: None if isinstance(unit.profile, PylontechProfile) else unit.profile
                for name, unit in units.items()}
    return [*serial_access_warnings(config), *budget_warnings(config, profiles)]


@dataclass(slots=True)
class AgentStats:
    polls: int = 0
    published: int = 0
    slots_skipped: int = 0


class RackAgent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._monotonic = monotonic
        self._wall = wall_clock
        self.topics = Topics(config.mqtt.topic_prefix, config.site_id)
        self.units = load_unit_profiles(config)
        self.links: dict[str, BmsLink] = {link.name: make_link(link, config.polling) for link in config.links}
        self._units_by_link: dict[str, list[UnitRuntime]] = {
            name: [u for u in self.units.values() if u.config.link == name] for name in self.links
        }
        self.metrics = AgentMetrics(config.rack_id, self)  # read when scraped, after start()
        # Lines that can recur at every poll go through here; the metrics count every event.
        self._log = ThrottledLog(log)
        self.stats = AgentStats()
        self.seq = 0
        # A new stream per run: the controller orders readings by seq within it and hears a restarted
        # agent at once (its seq starts again from 1; its clock may have moved either way).
        self.stream_id = uuid.uuid4().hex[:16]
        self.latest: RackTelemetry | None = None
        client_id = (
            config.mqtt.client_id
            or f"bmslink-agent-{config.site_id}-{config.rack_id}-{uuid.uuid4().hex[:8]}"
        )
        self._status_topic = self.topics.rack_status(config.rack_id)
        self._telemetry_topic = self.topics.rack_telemetry(config.rack_id)
        self.mqtt = MqttSession(
            config.mqtt,
            client_id,
            will=Will(self._status_topic, STATUS_OFFLINE),
            on_connected=self._on_mqtt_connected,
        )
        self.schedule: FixedRateSchedule | None = None
        # systemd (Type=notify, WatchdogSec=): READY once started, then pings while units get polled.
        self.watchdog = LoopWatchdog(Notifier.from_environ(), progress=self._unit_polls,
                                     status=self._status_line)
        self._watchdog_task: asyncio.Task[None] | None = None

    # -- MQTT --------------------------------------------------------------------------------

    def _on_mqtt_connected(self) -> None:
        # Runs on the loop right after CONNACK: announce, then send the latest state at once.
        self.mqtt.publish(self._status_topic, STATUS_ONLINE, qos=1, retain=True)
        if self.latest is not None:
            self._publish(self.latest)

    def _publish(self, telemetry: RackTelemetry) -> None:
        ok = self.mqtt.publish(
            self._telemetry_topic,
            encode(telemetry),
            qos=0,
            expiry_s=self.config.publish.message_expiry_s,
        )
        if ok:
            self.stats.published += 1
            self.metrics.published.labels(self.config.rack_id).inc()
        else:
            self.metrics.publish_dropped.labels(self.config.rack_id).inc()

    # -- polling -----------------------------------------------------------------------------

    async def _poll_unit(self, link: BmsLink, unit: UnitRuntime) -> None:
        timeout_s = self.config.polling.request_timeout_ms / 1000.0
        started = self._monotonic()
        labels = (self.config.rack_id, unit.name)
        discoveries = unit.discovery.attempts
        try:
            measurements = await link.read_unit(unit, timeout_s)
        except PollError as exc:
            if unit.discovery.attempts != discoveries:
                self.metrics.discoveries.labels(*labels, exc.status.value).inc()
            if exc.link_failure:
                self._poll_failed(link, unit, exc)
            else:
                self._reading_refused(unit, exc)
            return
        if unit.discovery.attempts != discoveries:
            self.metrics.discoveries.labels(*labels, "ok").inc()
        if unit.health.record_success(measurements):
            self._log.info(("restored", unit.name), "rack %s unit %s: communication restored",
                           self.config.rack_id, unit.name)
            self.metrics.comm_lost.labels(*labels).set(0)
        self.metrics.polls.labels(*labels, "ok").inc()
        self.metrics.poll_latency.labels(*labels).observe(self._monotonic() - started)

    def _poll_failed(self, link: BmsLink, unit: UnitRuntime, exc: PollError) -> None:
        labels = (self.config.rack_id, unit.name)
        first_of_streak = unit.health.consecutive_failures == 0
        changed_class = unit.health.status is not exc.status
        became_lost = unit.health.record_failure(exc)
        # The counters keep every failure; the log keeps a sample (a unit that flaps between ok and
        # failing, or between two classes, would otherwise write a line at every poll).
        self.metrics.polls.labels(*labels, exc.status.value).inc()
        if became_lost:
            self._log.error(("comm_lost", unit.name),
                            "rack %s %s; comm lost after %d consecutive failures, limits zeroed",
                            self.config.rack_id, exc, unit.health.consecutive_failures)
            self.metrics.comm_lost.labels(*labels).set(1)
            self._after_comm_lost(link, unit, exc)
        elif first_of_streak or changed_class:
            self._log.warning(("failed", unit.name, exc.status), "rack %s %s", self.config.rack_id, exc)
        else:
            log.debug("rack %s %s", self.config.rack_id, exc)

    def _reading_refused(self, unit: UnitRuntime, exc: PollError) -> None:
        """The BMS answered, but its reading is implausible: the unit is invalid, its link is fine.

        Counted and reported (the unit's status is ``invalid_data``, the rack grants no current while
        it is) but never towards comm loss: that would drop a working connection, and make the
        controller show ``comm_lost`` for a BMS it hears perfectly well (issue 12).
        """
        labels = (self.config.rack_id, unit.name)
        was_lost = unit.health.comm_lost
        was_invalid = unit.health.invalid
        unit.health.record_failure(exc)
        self.metrics.polls.labels(*labels, exc.status.value).inc()
        if was_lost and not unit.health.comm_lost:
            self._log.info(("restored", unit.name), "rack %s unit %s: communication restored",
                           self.config.rack_id, unit.name)
            self.metrics.comm_lost.labels(*labels).set(0)
        if was_invalid:
            log.debug("rack %s %s", self.config.rack_id, exc)
        else:
            self._log.warning(("invalid", unit.name), "rack %s %s; reading refused, link kept",
                              self.config.rack_id, exc)
        if (
            isinstance(unit.profile, SunSpecProfile)
            and unit.health.consecutive_failures == self.config.polling.comm_lost_after
        ):
            # Nonsense that lasts may be a device re-addressed under us: read its layout again (the
            # link is kept; discovery is a few reads), as a comm loss would.
            unit.plan = None

    def _after_comm_lost(self, link: BmsLink, unit: UnitRuntime, exc: PollError) -> None:
        if isinstance(unit.profile, SunSpecProfile):
            unit.plan = None  # the device may have been replaced or re-addressed: discover again
        if not exc.transient:
            return  # the device answers (with a layout we refuse): a new connection changes nothing
        peers = self._units_by_link[link.name]
        if link.reconnect_on_comm_loss and all(u.health.comm_lost for u in peers):
            link.mark_broken(f"all units on link {link.name} comm-lost")

    async def _poll_link(self, link: BmsLink, start_delay_s: float) -> None:
        if start_delay_s > 0:
            await asyncio.sleep(start_delay_s)
        for unit in self._units_by_link[link.name]:
            await self._poll_unit(link, unit)

    async def poll_once(self) -> RackTelemetry:
        """Poll every unit once and return the rack telemetry built from the results.

        Links start staggered over the first part of the slot instead of all at its first instant:
        a burst of N requests would queue behind each other (in this loop and in a gateway) and
        inflate every poll's latency; spread out, each sees an idle path.
        """
        links = list(self.links.values())
        spacing_s = STAGGER_FRACTION * self.config.polling.interval_ms / 1000.0 / max(1, len(links))
        await asyncio.gather(*(self._poll_link(link, k * spacing_s) for k, link in enumerate(links)))
        self.stats.polls += 1
        return self._build_telemetry()

    def _build_telemetry(self) -> RackTelemetry:
        units = list(self.units.values())
        lost = any(u.health.comm_lost for u in units)
        # A unit whose newest answer was refused as implausible: its last good reading no longer
        # describes it. The rack is published as heard (comm ok; the unit's status says invalid_data,
        # which the controller shows as "invalid") and, as a comm-lost one, grants no current.
        invalid = any(u.health.invalid for u in units)
        known = [(u.name, u.health.last_good) for u in units if u.health.last_good is not None]
        measurements = merge_units(known) if known else None
        if (lost or invalid) and measurements is not None:
            measurements = without_current_permission(measurements)
        self.seq += 1
        return RackTelemetry(
            site_id=self.config.site_id,
            rack_id=self.config.rack_id,
            stream_id=self.stream_id,
            seq=self.seq,
            timestamp_s=self._wall(),
            poll_interval_ms=self.config.polling.interval_ms,
            comm_state=RackCommState.COMM_LOST if lost else RackCommState.OK,
            measurements=measurements,
            units=tuple(u.health.to_wire() for u in units),
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the metrics endpoint and begin connecting to the broker and the BMS links."""
        for warning in line_warnings(self.config, self.units):
            log.warning("rack %s: %s", self.config.rack_id, warning)
        self.metrics.serve(self.config.metrics)
        await self.mqtt.start()
        for link in self.links.values():
            await link.start()
        # Give the links one poll interval to come up, so the first poll is not a certain failure.
        interval_s = self.config.polling.interval_ms / 1000.0
        # A link still down then fails its polls fast (connection_refused) until it is up.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval_s):
                await asyncio.gather(*(link.wait_connected() for link in self.links.values()))
        if self.watchdog.enabled:
            self._watchdog_task = asyncio.create_task(self.watchdog.run(), name="agent-watchdog")

    def _unit_polls(self) -> int:
        """Unit polls done (any outcome) and slots skipped: what moves while the poll loop runs."""
        return sum(sum(unit.health.counts.values()) for unit in self.units.values())

    def _status_line(self) -> str:
        ok = sum(1 for unit in self.units.values() if not unit.health.comm_lost and not unit.health.invalid)
        broker = "connected" if self.mqtt.is_connected else "away"
        return f"rack {self.config.rack_id}: {ok} of {len(self.units)} unit(s) ok, broker {broker}"

    async def run(self, stop: asyncio.Event, *, max_polls: int | None = None) -> None:
        """Start, then poll and publish until ``stop`` is set (or ``max_polls`` slots have run)."""
        await self.start()
        interval_s = self.config.polling.interval_ms / 1000.0
        self.schedule = FixedRateSchedule(self._monotonic(), interval_s)
        try:
            while not stop.is_set() and (max_polls is None or self.stats.polls < max_polls):
                slot = self.schedule.next_slot(self._monotonic())
                if slot.skipped:
                    self.stats.slots_skipped += slot.skipped
                    self.metrics.skipped_slots.labels(self.config.rack_id).inc(slot.skipped)
                    for unit in self.units.values():
                        unit.health.record_skipped_slot(slot.skipped)
                    self._log.warning(
                        ("overrun",), "rack %s: poll overran, %d slot(s) skipped",
                        self.config.rack_id, slot.skipped,
                    )
                delay = slot.start_s - self._monotonic()
                if delay > 0:
                    try:
                        async with asyncio.timeout(delay):
                            await stop.wait()
                        break
                    except TimeoutError:
                        pass
                telemetry = await self.poll_once()
                self.latest = telemetry
                self._publish(telemetry)
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop links, say "offline" (a clean disconnect suppresses the Last Will), close metrics."""
        self.watchdog.stopping()
        if self._watchdog_task is not None:
            self._watchdog_task.cancel()
            await asyncio.gather(self._watchdog_task, return_exceptions=True)
            self._watchdog_task = None
        for link in self.links.values():
            await link.stop()
        await self.mqtt.stop(final=(self._status_topic, STATUS_OFFLINE, True))
        self.metrics.close()
