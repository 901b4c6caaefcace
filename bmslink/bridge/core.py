"""The bridge's core: messages in, publications out, no sockets and no clocks of its own.

:class:`BridgeCore` is fed every message the session receives (with the receive times) and answers
with the messages to publish. What it refuses, it counts (``counters``) and logs through a
:class:`~shared.logthrottle.ThrottledLog`; nothing it refuses reaches a JSON topic: a JSON state is
only ever made from a payload the contract's decoders accepted (shared/records.py, shared/codec.py),
for a rack on the roster, stamped within ``checks.max_clock_ahead_s`` / ``max_clock_behind_s`` of
this clock, and in order within its agent's stream.

The roster is the active controller's: the racks of its last consolidated state. A rack that leaves
it loses its JSON state, its availability and its Home Assistant entities (empty retained payloads);
a rack that joins gets them. Left-overs of an earlier run (retained configs or availability of racks
no longer on the roster, or of entities this version no longer has) are removed once the roster is
known: the bridge subscribes to its own discovery and availability topics to learn them.

A rack's JSON state is published at most every ``publish.rack_interval_ms``; a change that matters
(link, contactor, alarms, warnings, unit statuses, the controller's verdict) goes at once, and the
latest reading held back goes when :meth:`tick` finds its interval over.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec

from bmslink.bridge.entities import BANK_ENTITIES, RACK_ENTITIES, Device, config_payload
from bmslink.bridge.render import ControllerSeen, bank_document, rack_document
from bmslink.bridge.topics import OFFLINE, ONLINE, JsonTopics, slug
from shared.bridge_config import BridgeConfig
from shared.cluster import ConsolidatedState, ControllerStatus, RackView
from shared.codec import DecodeError, Decoder
from shared.logthrottle import ThrottledLog
from shared.models import RackTelemetry
from shared.records import TelemetryDecoder
from shared.topics import STATUS_OFFLINE, STATUS_ONLINE, Topics

log = logging.getLogger(__name__)

# Bounds on what publishers we do not know can make us remember.
MAX_OFF_ROSTER = 64  # latest readings of racks not (yet) on the roster
MAX_AGENT_STATUSES = 4096
MAX_CONTROLLERS = 16
ACTIVE_ROLE = "active"


class Out(NamedTuple):
    """One message to publish, at QoS 0.

    QoS 0 for everything, retained messages included: the broker keeps a retained message whatever its
    QoS, and a burst of QoS 1 publications (the discovery configs of a roster: 25 per rack) would run
    out of the client's in-flight message ids (gmqtt refuses more than the broker's Receive Maximum
    unacknowledged). What QoS 1 would add, redelivery after a lost connection, the session does not
    do anyway: nothing is sent late (shared/mqtt.py); every retained message is sent again after each
    reconnect (:meth:`BridgeCore.on_connected`) and on Home Assistant's birth message.
    """

    topic: str
    payload: bytes
    retain: bool = False
    expiry_s: int | None = None


def _signature(t: RackTelemetry) -> tuple[Any, ...]:
    """What makes a reading worth publishing at once when it changes."""
    m = t.measurements
    units = tuple(u.status for u in t.units)
    if m is None:
        return (t.comm_state, None, (), (), units)
    return (t.comm_state, m.contactor, m.alarms.raised(), m.warnings.raised(), units)


def _verdict(view: RackView) -> tuple[Any, ...]:
    return (view.state, view.eligible, view.maintenance)


@dataclass(slots=True)
class RackSlot:
    """What the bridge knows of one roster rack."""

    rack_id: str
    telemetry: RackTelemetry | None = None
    received_s: float | None = None  # wall clock
    view: RackView | None = None
    agent_online: bool = False
    published_s: float | None = None  # monotonic, the last JSON state
    published_signature: tuple[Any, ...] | None = None
    published_verdict: tuple[Any, ...] | None = None


@dataclass(slots=True)
class _Discovery:
    seen: set[str] = field(default_factory=set)  # config topics with a config on the broker
    published: set[str] = field(default_factory=set)
    seen_racks: set[str] = field(default_factory=set)  # racks with a retained availability


class BridgeCore:
    def __init__(self, config: BridgeConfig, sw_version: str) -> None:
        self.config = config
        self.sw_version = sw_version
        site = config.site_id
        self.site_id = site
        self.topics = Topics(config.mqtt.topic_prefix, site)
        self.json = JsonTopics(config.mqtt.topic_prefix, site, config.discovery.prefix)
        checks = config.checks
        self._telemetry = TelemetryDecoder(checks.max_payload_bytes)
        self._state_decoder: Decoder[ConsolidatedState] = Decoder(ConsolidatedState, checks.max_payload_bytes)
        self._status_decoder: Decoder[ControllerStatus] = Decoder(ControllerStatus, checks.max_payload_bytes)
        self._interval_s = config.publish.rack_interval_ms / 1000.0
        self.counters: Counter[str] = Counter()
        self._log = ThrottledLog(log)
        self.roster: tuple[str, ...] | None = None
        self.racks: dict[str, RackSlot] = {}
        self._pending: set[str] = set()
        self._off_roster: OrderedDict[str, tuple[RackTelemetry, float]] = OrderedDict()
        self._agent_online: dict[str, bool] = {}
        self.state: ConsolidatedState | None = None
        self.controllers: dict[str, ControllerSeen] = {}
        self.bank_online: bool | None = None
        self._discovery = _Discovery()
        self._desired: dict[str, bytes] | None = None  # made again when the roster changes
        self._rack_head = self.topics.rack_head

    # -- what to subscribe to ---------------------------------------------------------------------

    def subscriptions(self) -> list[tuple[str, int]]:
        subs = [
            (self.topics.all_rack_telemetry, 0),
            (self.topics.all_rack_status, 1),
            (self.topics.cluster_state, 0),
            (self.topics.all_controller_status, 1),
            (self.json.all_rack_availability, 1),
        ]
        if self.config.discovery.enabled:
            subs += [(self.json.all_discovery_configs, 1), (self.json.home_assistant_status, 1)]
        return subs

    # -- input --------------------------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes, now_mono: float, now_wall: float) -> list[Out]:
        """One received message; the messages to publish in answer."""
        self.counters["received"] += 1
        if topic.startswith(self._rack_head):
            rack_id = self.topics.rack_id_from_topic(topic)
            if rack_id is not None and topic == self.topics.rack_telemetry(rack_id):
                return self._on_telemetry(rack_id, topic, payload, now_mono, now_wall)
            if rack_id is not None and topic == self.topics.rack_status(rack_id):
                return self._on_agent_status(rack_id, payload)
        elif topic == self.topics.cluster_state:
            return self._on_state(topic, payload, now_mono, now_wall)
        else:
            node = self.topics.controller_id_from_status_topic(topic)
            if node is not None:
                return self._on_controller_status(node, topic, payload)
            rack_id = self.json.rack_id_from_availability_topic(topic)
            if rack_id is not None:
                return self._on_own_availability(rack_id, payload)
            if self.config.discovery.enabled and self.json.is_discovery_config(topic):
                return self._on_own_config(topic, payload)
            if topic == self.json.home_assistant_status:
                return self._on_home_assistant_status(payload)
        self.counters["foreign_topic"] += 1
        return []

    def _refuse(self, kind: str, key: str, msg: str, *args: object) -> list[Out]:
        self.counters[kind] += 1
        self._log.warning((kind, key), msg, *args)
        return []

    def _clock_refusal(self, prefix: str, what: str, stamped_s: float, now_wall: float) -> list[Out] | None:
        checks = self.config.checks
        ahead_s = stamped_s - now_wall
        if ahead_s > checks.max_clock_ahead_s:
            return self._refuse(f"{prefix}future_timestamp", what, "%s: stamped %.1f s ahead of this clock "
                                "(tolerance %.1f s); not republished", what, ahead_s,
                                checks.max_clock_ahead_s)
        if -ahead_s > checks.max_clock_behind_s:
            return self._refuse(f"{prefix}old_timestamp", what, "%s: stamped %.1f s behind this clock "
                                "(tolerance %.1f s); not republished", what, -ahead_s,
                                checks.max_clock_behind_s)
        return None

    def _on_telemetry(self, rack_id: str, topic: str, payload: bytes, now_mono: float,
                      now_wall: float) -> list[Out]:
        try:
            telemetry = self._telemetry.decode(payload, topic)
        except DecodeError as exc:
            return self._refuse(f"rejected_{exc.reason.value}", rack_id, "rack %s: %s", rack_id, exc)
        if telemetry.rack_id != rack_id or telemetry.site_id != self.site_id:
            return self._refuse("identity_mismatch", rack_id, "rack %s: payload claims site %s rack %s; "
                                "not republished", rack_id, telemetry.site_id, telemetry.rack_id)
        refused = self._clock_refusal("", f"rack {rack_id}", telemetry.timestamp_s, now_wall)
        if refused is not None:
            return refused
        slot = self.racks.get(rack_id)
        if slot is None:
            self._remember_off_roster(rack_id, telemetry, now_wall)
            if self.roster is None:
                self.counters["before_roster"] += 1  # held until the first consolidated state
                return []
            return self._refuse("unknown_rack", rack_id, "rack %s is not on the controller's roster; "
                                "not republished", rack_id)
        old = slot.telemetry
        if old is not None and old.stream_id == telemetry.stream_id and telemetry.seq <= old.seq:
            self.counters["out_of_order"] += 1
            return []
        self.counters["accepted"] += 1
        slot.telemetry, slot.received_s = telemetry, now_wall
        urgent = _signature(telemetry) != slot.published_signature
        return self._publish_or_hold(slot, now_mono, urgent=urgent)

    def _remember_off_roster(self, rack_id: str, telemetry: RackTelemetry, now_wall: float) -> None:
        self._off_roster[rack_id] = (telemetry, now_wall)
        self._off_roster.move_to_end(rack_id)
        while len(self._off_roster) > MAX_OFF_ROSTER:
            self._off_roster.popitem(last=False)

    def _on_agent_status(self, rack_id: str, payload: bytes) -> list[Out]:
        if payload == STATUS_ONLINE:
            online = True
        elif payload in (STATUS_OFFLINE, b""):
            online = False
        else:
            return self._refuse("status_unrecognised", rack_id, "rack %s: status %r is neither online nor "
                                "offline; ignored", rack_id, payload[:32])
        if rack_id in self._agent_online or len(self._agent_online) < MAX_AGENT_STATUSES:
            self._agent_online[rack_id] = online
        slot = self.racks.get(rack_id)
        if slot is None or slot.agent_online == online:
            return []
        slot.agent_online = online
        return [self._rack_availability(slot)]

    def _on_state(self, topic: str, payload: bytes, now_mono: float, now_wall: float) -> list[Out]:
        try:
            state = self._state_decoder.decode(payload, topic)
        except DecodeError as exc:
            return self._refuse(f"state_rejected_{exc.reason.value}", "state", "consolidated state: %s", exc)
        if state.site_id != self.site_id:
            return self._refuse("state_identity_mismatch", "state", "consolidated state claims site %s; "
                                "not republished", state.site_id)
        refused = self._clock_refusal("state_", "consolidated state", state.timestamp_s, now_wall)
        if refused is not None:
            return refused
        self.counters["state_accepted"] += 1
        self.state = state
        out: list[Out] = []
        roster = tuple(view.rack_id for view in state.racks)
        if roster != self.roster:
            out += self._set_roster(roster, now_wall)
        for view in state.racks:
            slot = self.racks[view.rack_id]
            if view != slot.view:
                slot.view = view
                out += self._publish_or_hold(slot, now_mono, urgent=_verdict(view) != slot.published_verdict)
        bank = bank_document(state, self.controllers, now_wall)
        out.append(Out(self.json.bank_state, msgspec.json.encode(bank), retain=True,
                       expiry_s=self.config.publish.bank_expiry_s))
        self.counters["json_bank"] += 1
        return out

    def _on_controller_status(self, node: str, topic: str, payload: bytes) -> list[Out]:
        if payload in (STATUS_OFFLINE, b""):
            seen = ControllerSeen(online=False)
        else:
            try:
                status = self._status_decoder.decode(payload, topic)
            except DecodeError as exc:
                return self._refuse(f"controller_status_rejected_{exc.reason.value}", node,
                                    "controller %s status: %s", node, exc)
            if status.site_id != self.site_id or status.node_id != node:
                return self._refuse("controller_identity_mismatch", node, "controller %s status claims site "
                                    "%s node %s; ignored", node, status.site_id, status.node_id)
            seen = ControllerSeen(online=True, role=status.role, epoch=status.epoch)
        if node not in self.controllers and len(self.controllers) >= MAX_CONTROLLERS:
            return self._refuse("too_many_controllers", node, "controller %s: more than %d controllers "
                                "seen; ignored", node, MAX_CONTROLLERS)
        self.controllers[node] = seen
        return self._bank_availability()

    def _bank_availability(self, *, again: bool = False) -> list[Out]:
        online = any(s.online and s.role == ACTIVE_ROLE for s in self.controllers.values())
        if online == self.bank_online and not again:
            return []
        self.bank_online = online
        return [Out(self.json.bank_availability, ONLINE if online else OFFLINE, retain=True)]

    # -- our own retained topics (left-overs of earlier runs) ---------------------------------------

    def _on_own_availability(self, rack_id: str, payload: bytes) -> list[Out]:
        if not payload:
            self._discovery.seen_racks.discard(rack_id)
            return []
        self._discovery.seen_racks.add(rack_id)
        if self.roster is not None and rack_id not in self.racks:
            return self._clear_rack(rack_id)
        return []

    def _on_own_config(self, topic: str, payload: bytes) -> list[Out]:
        found = self._discovery
        if not payload:
            found.seen.discard(topic)
            return []
        found.seen.add(topic)
        if self.roster is not None and topic not in self._desired_configs():
            return self._remove_configs({topic})
        return []

    def _on_home_assistant_status(self, payload: bytes) -> list[Out]:
        # Home Assistant's birth message: it may have lost what it knew (docs: "Discovery payload").
        if payload != ONLINE:
            return []
        self.counters["home_assistant_birth"] += 1
        return self._announce(everything=True)

    # -- roster and discovery ---------------------------------------------------------------------

    def _set_roster(self, roster: tuple[str, ...], now_wall: float) -> list[Out]:
        out: list[Out] = []
        old = set(self.racks)
        for rack_id in old - set(roster):
            del self.racks[rack_id]
            self._pending.discard(rack_id)
            out += self._clear_rack(rack_id)
            log.info("rack %s left the roster: its JSON state, availability and entities are removed",
                     rack_id)
        for rack_id in roster:
            if rack_id in old:
                continue
            online = self._agent_online.get(rack_id, False)
            slot = self.racks[rack_id] = RackSlot(rack_id, agent_online=online)
            held = self._off_roster.pop(rack_id, None)
            if held is not None:
                slot.telemetry, slot.received_s = held
            out.append(self._rack_availability(slot))
        self.roster = roster
        self._desired = None
        for rack_id in self._discovery.seen_racks - set(roster):
            out += self._clear_rack(rack_id)
        return out + self._announce(everything=False)

    def _clear_rack(self, rack_id: str) -> list[Out]:
        """Empty retained payloads: the broker forgets the rack's JSON state and availability."""
        self._discovery.seen_racks.discard(rack_id)
        self.counters["racks_cleared"] += 1
        return [Out(self.json.rack_state(rack_id), b"", retain=True),
                Out(self.json.rack_availability(rack_id), b"", retain=True)]

    def _desired_configs(self) -> dict[str, bytes]:
        """Every discovery config this bridge stands for now: the bank's and each roster rack's."""
        if self._desired is None:
            self._desired = self._make_configs() if self.config.discovery.enabled else {}
        return self._desired

    def _make_configs(self) -> dict[str, bytes]:
        site, expire = self.site_id, self.config.discovery.expire_after_s
        bank = Device(f"bmslink_{site}_bank", f"{site} bank", "battery bank (cluster controller)")
        bank_availability = (self.json.bridge_status, self.json.bank_availability)
        configs: dict[str, bytes] = {}
        for entity in BANK_ENTITIES:
            topic = self.json.discovery_config(entity.component.value, f"bank_{entity.key}")
            configs[topic] = msgspec.json.encode(config_payload(
                entity, unique_id=f"bmslink_{site}_bank_{entity.key}", state_topic=self.json.bank_state,
                availability=bank_availability, device=bank, sw_version=self.sw_version,
                expire_after_s=expire))
        used: dict[str, str] = {}
        for rack_id in self.racks:
            level = slug(rack_id)
            if used.setdefault(level, rack_id) != rack_id:
                self._refuse("discovery_slug_collision", rack_id, "racks %s and %s make the same discovery "
                             "topic level %s; %s gets no entities", used[level], rack_id, level, rack_id)
                continue
            device = Device(f"bmslink_{site}_{rack_id}", f"{site} {rack_id}", "battery rack",
                            via=bank.identifier)
            availability = (self.json.bridge_status, self.json.rack_availability(rack_id))
            for entity in RACK_ENTITIES:
                topic = self.json.discovery_config(entity.component.value, f"rack_{level}_{entity.key}")
                configs[topic] = msgspec.json.encode(config_payload(
                    entity, unique_id=f"bmslink_{site}_{rack_id}_{entity.key}",
                    state_topic=self.json.rack_state(rack_id), availability=availability, device=device,
                    sw_version=self.sw_version, expire_after_s=expire))
        return configs

    def _announce(self, *, everything: bool) -> list[Out]:
        """Publish the configs not published yet (all of them with ``everything``), and remove what the
        broker holds that this bridge no longer stands for (once the roster is known)."""
        if not self.config.discovery.enabled:
            return []
        desired = self._desired_configs()
        found = self._discovery
        out = [Out(topic, payload, retain=True) for topic, payload in desired.items()
               if everything or topic not in found.published]
        self.counters["discovery_published"] += len(out)
        if self.roster is not None:
            out += self._remove_configs((found.seen | found.published) - set(desired))
        found.published = set(desired)
        return out

    def _remove_configs(self, topics: set[str]) -> list[Out]:
        found = self._discovery
        found.seen -= topics
        found.published -= topics
        self.counters["discovery_removed"] += len(topics)
        return [Out(topic, b"", retain=True) for topic in sorted(topics)]

    # -- output -------------------------------------------------------------------------------

    def _publish_or_hold(self, slot: RackSlot, now_mono: float, *, urgent: bool) -> list[Out]:
        last = slot.published_s
        if urgent or last is None or now_mono - last >= self._interval_s:
            return [self._rack_state(slot, now_mono)]
        self._pending.add(slot.rack_id)
        return []

    def _rack_state(self, slot: RackSlot, now_mono: float) -> Out:
        self._pending.discard(slot.rack_id)
        slot.published_s = now_mono
        if slot.telemetry is not None:
            slot.published_signature = _signature(slot.telemetry)
        if slot.view is not None:
            slot.published_verdict = _verdict(slot.view)
        self.counters["json_rack"] += 1
        doc = rack_document(slot.rack_id, self.site_id, slot.telemetry, view=slot.view, state=self.state,
                            received_s=slot.received_s)
        return Out(self.json.rack_state(slot.rack_id), msgspec.json.encode(doc), retain=True,
                   expiry_s=self.config.publish.rack_expiry_s)

    def _rack_availability(self, slot: RackSlot) -> Out:
        return Out(self.json.rack_availability(slot.rack_id), ONLINE if slot.agent_online else OFFLINE,
                   retain=True)

    def tick(self, now_mono: float) -> list[Out]:
        """The readings held back whose interval is over."""
        due = [rack_id for rack_id in self._pending
               if now_mono - (self.racks[rack_id].published_s or 0.0) >= self._interval_s]
        return [self._rack_state(self.racks[rack_id], now_mono) for rack_id in due]

    def on_connected(self) -> list[Out]:
        """After every (re)connect: a broker that restarted without persistence lost our retained
        messages, so the bridge's status, the availabilities and the configs go again."""
        out = [Out(self.json.bridge_status, ONLINE, retain=True)]
        out += [self._rack_availability(slot) for slot in self.racks.values()]
        if self.bank_online is not None:
            out += self._bank_availability(again=True)
        return out + self._announce(everything=True)

    def stats(self) -> dict[str, Any]:
        """The counters, for the stats topic and the log."""
        return {
            "site_id": self.site_id,
            "roster_size": None if self.roster is None else len(self.roster),
            "bank_online": self.bank_online,
            "counters": dict(sorted(self.counters.items())),
        }

    def stats_message(self) -> Out:
        return Out(self.json.bridge_stats, msgspec.json.encode(self.stats()))
