"""The bridge's own topics: every JSON, availability and discovery topic name is made here.

Under the site's base (``{prefix}/{site}``, as :class:`shared.topics.Topics`)::

    json/rack/{rack}/state          retained JSON state of one rack, Message Expiry as its telemetry
    json/rack/{rack}/availability   retained online / offline: the rack's agent (its status topic)
    json/bank/state                 retained JSON state of the bank, Message Expiry as the cluster state
    json/bank/availability          retained online / offline: is an active controller online
    json/bridge/status              retained online / Last Will offline: this bridge
    json/bridge/stats               the bridge's counters (JSON), every publish.stats_interval_s

Home Assistant discovery (https://www.home-assistant.io/integrations/mqtt/, "Discovery topic"):
``{discovery prefix}/{component}/{node}/{object}/config`` with node ``bmslink_{site}`` and object
``rack_{rack}_{entity}`` or ``bank_{entity}``. Those levels allow ``[a-zA-Z0-9_-]`` only: a ``.`` of
a site or rack id becomes ``_`` (:func:`slug`).
"""

from __future__ import annotations

from dataclasses import dataclass

ONLINE = b"online"
OFFLINE = b"offline"


def slug(text: str) -> str:
    """``text`` as a discovery topic level: our identifiers allow ``.``, Home Assistant's do not."""
    return text.replace(".", "_")


@dataclass(frozen=True, slots=True)
class JsonTopics:
    prefix: str
    site_id: str
    discovery_prefix: str = "homeassistant"

    @property
    def _base(self) -> str:
        return f"{self.prefix}/{self.site_id}/json"

    def rack_state(self, rack_id: str) -> str:
        return f"{self._base}/rack/{rack_id}/state"

    def rack_availability(self, rack_id: str) -> str:
        return f"{self._base}/rack/{rack_id}/availability"

    @property
    def all_rack_availability(self) -> str:
        return self.rack_availability("+")

    def rack_id_from_availability_topic(self, topic: str) -> str | None:
        head, tail = f"{self._base}/rack/", "/availability"
        if not (topic.startswith(head) and topic.endswith(tail)):
            return None
        rack_id = topic[len(head):-len(tail)]
        return rack_id if rack_id and "/" not in rack_id else None

    @property
    def bank_state(self) -> str:
        return f"{self._base}/bank/state"

    @property
    def bank_availability(self) -> str:
        return f"{self._base}/bank/availability"

    @property
    def bridge_status(self) -> str:
        return f"{self._base}/bridge/status"

    @property
    def bridge_stats(self) -> str:
        return f"{self._base}/bridge/stats"

    # -- Home Assistant discovery ----------------------------------------------------------------

    @property
    def discovery_node(self) -> str:
        return slug(f"bmslink_{self.site_id}")

    def discovery_config(self, component: str, object_id: str) -> str:
        return f"{self.discovery_prefix}/{component}/{self.discovery_node}/{object_id}/config"

    @property
    def all_discovery_configs(self) -> str:
        """Every discovery config of this site's node, whatever the component and object."""
        return f"{self.discovery_prefix}/+/{self.discovery_node}/+/config"

    def is_discovery_config(self, topic: str) -> bool:
        parts = topic.split("/")
        head = self.discovery_prefix.split("/")
        return (len(parts) == len(head) + 4 and parts[:len(head)] == head
                and parts[len(head) + 1] == self.discovery_node and parts[-1] == "config")

    @property
    def home_assistant_status(self) -> str:
        """Home Assistant's birth message (``online``): discovery is sent again when it comes."""
        return f"{self.discovery_prefix}/status"
