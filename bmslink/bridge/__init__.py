"""``bmslink bridge``: a site's msgpack telemetry and consolidated state republished as readable JSON,
with Home Assistant MQTT discovery (one device per rack and one for the bank).

* :mod:`bmslink.bridge.topics` — the JSON, availability and discovery topic names;
* :mod:`bmslink.bridge.render` — the JSON documents (pure);
* :mod:`bmslink.bridge.entities` — the Home Assistant entities as tables, and their configs (pure);
* :mod:`bmslink.bridge.core` — messages in, publications out; what is refused and why (pure);
* :mod:`bmslink.bridge.service` — the MQTT session around the core;
* :mod:`bmslink.bridge.cli` — ``bmslink bridge --config bridge.toml``.

Configuration: :mod:`shared.bridge_config`. Operator notes: README.md ("JSON and Home Assistant").
"""
