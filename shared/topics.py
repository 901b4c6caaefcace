"""MQTT topic scheme. Every name lives here; nobody formats a topic string elsewhere.

``{prefix}/{site}/rack/{rack}/telemetry``   msgpack RackTelemetry, QoS 0, Message Expiry
``{prefix}/{site}/rack/{rack}/status``      retained ``online`` / Last Will ``offline``
``{prefix}/{site}/controller/{node}/status`` retained controller role record
``{prefix}/{site}/controller/leader``       retained leader record (epoch, node), with expiry
``{prefix}/{site}/controller/latches``      retained latched alarms of the active (LatchSet)
``{prefix}/{site}/controller/{node}/events`` the controller's journal entries (JournalEvent)
``{prefix}/{site}/cluster/state``           msgpack consolidated state from the active controller
``{prefix}/{site}/cmd/controller``          signed operator commands to the active controller
``{prefix}/{site}/reply/{command id}``      the active controller's reply to one command
"""

from __future__ import annotations

from dataclasses import dataclass

STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str
    site_id: str

    @property
    def _base(self) -> str:
        return f"{self.prefix}/{self.site_id}"

    def rack_telemetry(self, rack_id: str) -> str:
        return f"{self._base}/rack/{rack_id}/telemetry"

    def rack_status(self, rack_id: str) -> str:
        return f"{self._base}/rack/{rack_id}/status"

    @property
    def all_rack_telemetry(self) -> str:
        return f"{self._base}/rack/+/telemetry"

    @property
    def all_rack_status(self) -> str:
        return f"{self._base}/rack/+/status"

    def controller_status(self, node_id: str) -> str:
        return f"{self._base}/controller/{node_id}/status"

    @property
    def all_controller_status(self) -> str:
        return f"{self._base}/controller/+/status"

    @property
    def leader(self) -> str:
        return f"{self._base}/controller/leader"

    def controller_events(self, node_id: str) -> str:
        return f"{self._base}/controller/{node_id}/events"

    @property
    def latches(self) -> str:
        return f"{self._base}/controller/latches"

    @property
    def all_command_replies(self) -> str:
        return self.command_reply("+")

    @property
    def cluster_state(self) -> str:
        return f"{self._base}/cluster/state"

    def command(self, target: str) -> str:
        return f"{self._base}/cmd/{target}"

    @property
    def command_request(self) -> str:
        """Where operators send signed commands (shared/commands.py); the active controller executes."""
        return self.command("controller")

    def command_reply(self, command_id: str) -> str:
        return f"{self._base}/reply/{command_id}"

    def controller_id_from_status_topic(self, topic: str) -> str | None:
        """The node id of a controller status topic under this site, or None if the topic is not one."""
        head = f"{self._base}/controller/"
        if not (topic.startswith(head) and topic.endswith("/status")):
            return None
        node = topic[len(head) : -len("/status")]
        return node if node and "/" not in node else None

    @property
    def rack_head(self) -> str:
        """What every per-rack topic of this site starts with."""
        return f"{self._base}/rack/"

    def rack_id_from_topic(self, topic: str) -> str | None:
        """The rack id of a per-rack topic under this site, or None if the topic is not one."""
        head = self.rack_head
        if not topic.startswith(head):
            return None
        rest = topic[len(head) :]
        rack_id, sep, _kind = rest.partition("/")
        return rack_id if sep and rack_id else None
