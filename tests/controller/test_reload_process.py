"""SIGHUP makes a running controller process adopt a new roster; a broken file is refused and logged."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from tests.fixtures.broker import MosquittoBroker, free_port
from tests.fixtures.procs import ProcessGroup, bmslink_cli

CONFIG = """\
site_id = "site-a"
node_id = "n1"
[mqtt]
port = {port}
[can]
interface = "virtual"
channel = "reload-{chan}"
period_ms = 200
{roster}
"""


def _roster(*racks: str) -> str:
    return "\n".join(f'[[roster]]\nrack_id = "{r}"\ncapacity_ah = 280\n' for r in racks)


async def test_sighup_reloads_the_roster_and_refuses_a_broken_file(
    tmp_path: Path, mqtt_broker: MosquittoBroker, procs: ProcessGroup
) -> None:
    path = tmp_path / "controller.toml"
    chan = free_port()
    path.write_text(CONFIG.format(port=mqtt_broker.port, chan=chan, roster=_roster("rack-01")))
    procs.start("ctl", bmslink_cli("controller", "--config", str(path)))
    await asyncio.to_thread(procs.wait_for_output, "ctl", "connected to", 15.0)
    path.write_text(CONFIG.format(port=mqtt_broker.port, chan=chan, roster=_roster("rack-01", "rack-02")))
    procs.send_signal("ctl", signal.SIGHUP)
    await asyncio.to_thread(procs.wait_for_output, "ctl", "roster now ['rack-01', 'rack-02']", 5.0)
    path.write_text("this is not toml [")
    procs.send_signal("ctl", signal.SIGHUP)
    await asyncio.to_thread(procs.wait_for_output, "ctl", "reload refused", 5.0)
    assert procs.get("ctl").poll() is None  # still running on the last good config
