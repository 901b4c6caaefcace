"""``bmslink demo`` as a new user runs it: the web pages it prints answer with the site's racks, and
Home Assistant discovery and the JSON states appear on its broker."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

DEMO_S = 30


def test_the_demo_serves_its_web_pages_and_announces_home_assistant_entities() -> None:
    argv = [sys.executable, "-m", "bmslink", "demo", "--racks", "2", "--duration", str(DEMO_S)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(line.startswith("JSON and Home") for line in lines):
            lines.append(proc.stdout.readline())
        text = "".join(lines)
        pages = re.findall(r"http://127\.0\.0\.1:\d+/", text)
        broker = re.search(r"mqtt://127\.0\.0\.1:(\d+)", text)
        assert len(pages) == 2 and broker is not None, text

        seen: dict[str, bytes | bytearray] = {}
        client = paho.Client(CallbackAPIVersion.VERSION2)
        client.on_message = lambda _c, _u, msg: seen.__setitem__(msg.topic, msg.payload)
        client.connect("127.0.0.1", int(broker.group(1)))
        client.subscribe([("homeassistant/#", 0), ("bmslink/demo/json/#", 0)])
        client.loop_start()
        try:
            racks: list[str] = []
            deadline = time.monotonic() + 20
            def complete() -> bool:
                return bool(racks) and any("/json/rack/" in t for t in seen) and any(
                    t.endswith("/config") for t in seen)

            while time.monotonic() < deadline and not complete():
                time.sleep(0.5)
                for page in pages:
                    try:
                        with urllib.request.urlopen(page + "api/state", timeout=2) as answer:
                            state = json.loads(answer.read())
                    except OSError:
                        continue
                    racks = [r["rack_id"] for r in state.get("racks", [])] or racks
        finally:
            client.loop_stop()
            client.disconnect()
        with urllib.request.urlopen(pages[0], timeout=2) as answer:
            assert answer.status == 200 and b"<html" in answer.read().lower()
        configs = [t for t in seen if t.startswith("homeassistant/") and t.endswith("/config")]
        assert configs and any("/json/rack/rack-01/" in t for t in seen), sorted(seen)[:20]
        assert racks == ["rack-01", "rack-02"], racks
    finally:
        out, _ = proc.communicate(timeout=DEMO_S + 30)
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out
