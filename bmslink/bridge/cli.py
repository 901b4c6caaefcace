"""``bmslink bridge``: the command line of the JSON / Home Assistant bridge."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_bridge_parser(sub: Any) -> None:
    """Register ``bridge`` on the ``bmslink`` subcommands (``sub``: argparse's subparsers action)."""
    bridge: argparse.ArgumentParser = sub.add_parser(
        "bridge", help="republish a site's telemetry and state as JSON, with Home Assistant discovery")
    bridge.add_argument("--config", type=Path, required=True, help="bridge TOML file")
    bridge.add_argument("--check-config", action="store_true", help="validate the config and exit")
    bridge.set_defaults(handler=_cmd_bridge)


def _cmd_bridge(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415

    from bmslink.bridge.service import BridgeService  # noqa: PLC0415
    from bmslink.cli import EXIT_OK, run_until_signalled  # noqa: PLC0415
    from shared.bridge_config import BridgeConfig  # noqa: PLC0415
    from shared.config import load_config  # noqa: PLC0415

    config = load_config(args.config, BridgeConfig)
    if args.check_config:
        discovery = config.discovery.prefix if config.discovery.enabled else "off"
        print(f"{args.config}: ok (site {config.site_id}, broker {config.mqtt.host}:{config.mqtt.port}, "
              f"discovery {discovery})")
        return EXIT_OK

    async def main(stop: asyncio.Event) -> None:
        await BridgeService(config).run(stop)

    return run_until_signalled(main)
