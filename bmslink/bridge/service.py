"""The bridge's I/O shell: one MQTT session, the core fed from its handler, a tick for held readings.

Everything the core answers is published at once, from the session's handler (on the event loop, as
each message is read): a JSON state follows its msgpack reading without a queue in between. The tick
task publishes the readings the core held back (``publish.rack_interval_ms``) and, every
``publish.stats_interval_s``, the counters (stats topic and log). The bridge's status is retained
``online`` while it runs, with a Last Will ``offline`` and a final ``offline`` on a clean stop: Home
Assistant's entities all list it among their availability topics.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable

from bmslink import __version__
from bmslink.bridge.core import BridgeCore, Out
from bmslink.bridge.topics import OFFLINE
from shared.bridge_config import BridgeConfig
from shared.mqtt import Message, MqttSession, Will

log = logging.getLogger(__name__)

TICK_MAX_S = 0.25
TICK_MIN_S = 0.02


class BridgeService:
    def __init__(self, config: BridgeConfig, *, wall_clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.core = BridgeCore(config, __version__)
        self._wall = wall_clock
        client_id = config.mqtt.client_id or f"bmslink-bridge-{config.site_id}-{uuid.uuid4().hex[:8]}"
        self.session = MqttSession(
            config.mqtt, client_id, will=Will(self.core.json.bridge_status, OFFLINE),
            on_connected=self._on_connected, on_message=self._on_message,
        )
        for topic, qos in self.core.subscriptions():
            self.session.subscribe(topic, qos=qos)
        interval_s = config.publish.rack_interval_ms / 1000.0
        self._tick_s = TICK_MAX_S if interval_s == 0 else max(TICK_MIN_S, min(TICK_MAX_S, interval_s / 4))

    def _send(self, out: Iterable[Out]) -> None:
        for o in out:
            self.session.publish(o.topic, o.payload, retain=o.retain, expiry_s=o.expiry_s)

    def _on_connected(self) -> None:
        self._send(self.core.on_connected())

    def _on_message(self, msg: Message) -> None:
        self._send(self.core.on_message(msg.topic, msg.payload, msg.received_monotonic_s, self._wall()))

    async def run(self, stop: asyncio.Event) -> None:
        """Bridge until ``stop`` is set; then say ``offline`` and disconnect."""
        await self.session.start()
        log.info("bridge for site %s: JSON under %s/%s/json, discovery %s", self.config.site_id,
                 self.config.mqtt.topic_prefix, self.config.site_id,
                 self.config.discovery.prefix if self.config.discovery.enabled else "off")
        stats_every_s = self.config.publish.stats_interval_s
        next_stats = time.monotonic() + stats_every_s
        try:
            while not stop.is_set():
                try:
                    async with asyncio.timeout(self._tick_s):
                        await stop.wait()
                except TimeoutError:
                    pass
                now = time.monotonic()
                self._send(self.core.tick(now))
                if now >= next_stats:
                    next_stats = now + stats_every_s
                    self._send([self.core.stats_message()])
                    log.info("bridge %s: %s", self.config.site_id, self.core.stats()["counters"])
        finally:
            await self.session.stop(final=(self.core.json.bridge_status, OFFLINE, True))
