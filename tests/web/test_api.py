"""The web page without a browser: its JSON endpoints on a real controller service (real broker,
python-can virtual bus), the bounded history, bounded live clients, and its configuration."""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bmslink.cli import main
from controller.service import ControllerService
from controller.web import WebPage, WebServerError
from controller.web.history import History, Sample
from controller.web.server import CLIENT_QUEUE, SECURITY_HEADERS, WRITE_TIMEOUT_S
from shared.config import ConfigError, load_config
from shared.controller_config import ControllerConfig
from tests.agent.helpers import wait_until
from tests.fixtures.broker import MosquittoBroker, free_port
from tests.web.site import RACK_CCL_A, RACK_DCL_A, WebSite, controller_config

TIMEOUT = aiohttp.ClientTimeout(total=5)


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http, http.get(url) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"] == "application/json"
        return await response.json()


async def admitted(site: WebSite, svc: ControllerService, racks: int) -> None:
    await wait_until(lambda: svc.state is not None and svc.state.eligible_racks == racks, 5.0,
                     f"{racks} racks admitted")


async def test_the_json_endpoints_show_racks_bank_controllers_and_events(
    site: WebSite, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bmslink.journal")  # rack_state events are journaled at INFO
    svc = await site.start(racks=3)
    site.publishing |= {"rack-01", "rack-02"}
    await admitted(site, svc, 2)
    await asyncio.sleep(2.2)  # two page updates after the admission

    doc = await get_json(site.url(path="/api/state"))
    assert (doc["site_id"], doc["node_id"], doc["period_s"], doc["history_s"]) == ("site-a", "n1", 1.0, 3600)
    racks = {r["rack_id"]: r for r in doc["racks"]}
    assert racks.keys() == {"rack-01", "rack-02", "rack-03"}
    assert racks["rack-01"]["state"] == "ok" and racks["rack-01"]["eligible"] is True
    assert racks["rack-01"]["charge_current_limit_a"] == RACK_CCL_A
    assert racks["rack-03"]["state"] == "stale" and racks["rack-03"]["eligible"] is False
    assert "no valid telemetry" in racks["rack-03"]["reason"]
    assert all(r["maintenance"] is False for r in racks.values())
    bank = doc["bank"]
    assert bank["charge_current_limit_a"] == 2 * RACK_CCL_A  # n_times_min over two eligible racks
    assert bank["discharge_current_limit_a"] == 2 * RACK_DCL_A
    assert "2 eligible" in bank["ccl_reason"] and "rack-0" in bank["ccl_reason"]
    assert bank["dcl_reason"] and bank["cvl_reason"] and bank["dvl_reason"]
    assert (bank["eligible_racks"], bank["roster_size"]) == (2, 3)
    assert doc["controllers"] == [{
        "node_id": "n1", "node_number": 0, "this": True, "role": "active", "epoch": 0, "rank": None,
        "reason": "single controller (failover off)", "since_s": None, "heard_s_ago": None, "live": True}]
    assert doc["links"] == {"mqtt_connected": True, "can_healthy": True, "foreign_transmitter": False}
    assert doc["sample"]["ccl_a"] == 2 * RACK_CCL_A

    # The journal: what happened to the racks, newest last; ?limit bounds it.
    kinds = [(e["kind"], e["rack_id"]) for e in doc["events"]]
    assert ("rack_state", "rack-01") in kinds and ("limit", "") in kinds
    events = (await get_json(site.url(path="/api/events")))["events"]
    assert events[-len(doc["events"]):] == doc["events"]
    one = (await get_json(site.url(path="/api/events?limit=1")))["events"]
    assert one == events[-1:]
    assert (await get_json(site.url(path="/api/events?limit=0")))["events"] == []

    history = await get_json(site.url(path="/api/history"))
    assert history["capacity"] == 3600 and history["period_s"] == 1.0
    assert len(history["t_s"]) >= 2 and all(len(history[k]) == len(history["t_s"]) for k in (
        "ccl_a", "dcl_a", "soc_pct", "temperature_max_c", "temperature_min_c", "temperature_avg_c"))
    assert history["ccl_a"][-1] == 2 * RACK_CCL_A and history["soc_pct"][-1] == 64.0
    assert history["t_s"] == sorted(history["t_s"])
    newer = await get_json(site.url(path=f"/api/history?since={history['t_s'][-2]}"))
    assert newer["t_s"][0] == history["t_s"][-1]


async def test_the_page_and_its_assets_are_served_read_only_with_a_strict_policy(site: WebSite) -> None:
    await site.start(racks=1)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        for path, kind, needle in (("/", "text/html", "/app.js"),
                                   ("/app.js", "text/javascript", "EventSource"),
                                   ("/style.css", "text/css", "svg")):
            async with http.get(site.url(path=path)) as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith(kind)
                assert needle in await response.text()
                for name, value in SECURITY_HEADERS.items():
                    assert response.headers[name] == value
        async with http.post(site.url(path="/api/state"), data=b"x") as response:
            assert response.status == 405
        async with http.get(site.url(path="/etc/passwd")) as response:
            assert response.status == 404
        for query in ("limit=-1", "limit=abc", "limit=1.5"):
            async with http.get(site.url(path=f"/api/events?{query}")) as response:
                assert response.status == 400 and "whole number" in await response.text()
        for query in ("since=abc", "since=nan", "since=inf"):
            async with http.get(site.url(path=f"/api/history?{query}")) as response:
                assert response.status == 400 and "since must be" in await response.text()


def test_the_history_is_a_ring_of_fixed_size() -> None:
    ring = History(5)
    size = ring.nbytes
    assert ring.latest() is None and ring.columns()["t_s"] == []
    for i in range(12):
        ring.append(Sample(t_s=1000.0 + i, ccl_a=float(i), dcl_a=2.0 * i, soc_pct=50.0,
                           temperature_max_c=30.0, temperature_min_c=20.0, temperature_avg_c=math.nan))
    assert len(ring) == 5 and ring.nbytes == size  # twelve samples in, five kept, no growth
    columns = ring.columns()
    assert columns["t_s"] == [1007.0, 1008.0, 1009.0, 1010.0, 1011.0]
    assert columns["ccl_a"] == [7.0, 8.0, 9.0, 10.0, 11.0]
    assert columns["temperature_avg_c"] == [None] * 5  # JSON has no NaN
    assert ring.columns(since_s=1009.0)["dcl_a"] == [20.0, 22.0]
    latest = ring.latest()
    assert latest is not None and latest.t_s == 1011.0
    with pytest.raises(ValueError, match="at least 1"):
        History(0)


async def test_history_s_sets_the_ring_and_the_page_samples_once_a_second(site: WebSite) -> None:
    svc = await site.start(racks=1, web={"history_s": 60})
    site.publishing.add("rack-01")
    assert svc.web is not None and svc.web.history.capacity == 60
    size = svc.web.history.nbytes
    await admitted(site, svc, 1)
    before = len(svc.web.history)
    await asyncio.sleep(3.0)
    assert 2 <= len(svc.web.history) - before <= 4
    assert svc.web.history.nbytes == size
    assert (await get_json(site.url(path="/api/history")))["history_s"] == 60


async def test_the_page_is_off_by_default(mqtt_broker: MosquittoBroker, unique_topic_prefix: str) -> None:
    config = controller_config(mqtt_broker, unique_topic_prefix, f"off-{free_port()}", web=None)
    assert not config.web.enabled and config.web.host == "127.0.0.1"
    assert [what for what, _host in config.listeners()] == []
    svc = ControllerService(config)
    await svc.start()
    try:
        assert svc.web is None
    finally:
        await svc.stop()


CONTROLLER = """site_id = "site-a"
node_id = "ctl-a"

[[roster]]
rack_id = "rack-01"
capacity_ah = 280
"""


@pytest.mark.parametrize(("web", "expected"), [
    ("port = 70000", "web.port: Input should be less than or equal to 65535 (got 70000)"),
    ("port = 0", "web.port: Input should be greater than or equal to 1"),
    ("history_s = 31536000", "web.history_s: Input should be less than or equal to 86400 (got 31536000)"),
    ("history_s = 5", "web.history_s: Input should be greater than or equal to 60"),
    ('host = "my-laptop"', "web.host"),
    ("max_clients = 1000", "web.max_clients: Input should be less than or equal to 64"),
    ("enabeld = true", "web.enabeld"),
])
def test_a_bad_web_table_is_a_clear_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], web: str, expected: str
) -> None:
    path = tmp_path / "controller.toml"
    path.write_text(f"{CONTROLLER}\n[web]\nenabled = true\n{web}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, ControllerConfig)
    assert expected in str(caught.value)
    assert main(["controller", "--config", str(path), "--check-config"]) == 2
    err = capsys.readouterr().err
    assert f"invalid configuration in {path}" in err and expected in err


def test_a_page_beyond_loopback_is_warned_about_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from bmslink.cli import _warn_exposed  # noqa: PLC0415

    path = tmp_path / "controller.toml"
    # A documentation address (RFC 5737): only validated and warned about, never bound.
    path.write_text(f'{CONTROLLER}\n[web]\nenabled = true\nhost = "192.0.2.10"\nport = 8081\n')
    config = load_config(path, ControllerConfig)
    assert ("web", "192.0.2.10") in config.listeners()
    with caplog.at_level(logging.WARNING, logger="bmslink"):
        _warn_exposed(config.listeners())
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["web listens on 192.0.2.10"]


async def test_an_address_in_use_is_a_clear_error(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = controller_config(mqtt_broker, unique_topic_prefix, "in-use", web={"port": port})
        page = WebPage(config, ControllerService(config))
        with pytest.raises(WebServerError) as caught:
            await page.start()
        assert caught.value.address == f"127.0.0.1:{port}"
        assert "cannot serve the web page on 127.0.0.1:" in str(caught.value)
        await page.stop()


async def read_event(response: aiohttp.ClientResponse) -> bytes:
    """The next whole SSE event (up to its blank line)."""
    lines = []
    while (line := await asyncio.wait_for(response.content.readline(), 5.0)) not in (b"\n", b""):
        lines.append(line)
    return b"".join(lines)


async def test_max_clients_bounds_the_live_pages(site: WebSite) -> None:
    svc = await site.start(racks=1, web={"max_clients": 2})
    assert svc.web is not None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        first = await http.get(site.url(path="/api/stream"))
        second = await http.get(site.url(path="/api/stream"))
        assert first.headers["Content-Type"] == "text/event-stream"
        assert b"event: state\ndata: {" in await read_event(first)  # at once, not after a period
        await read_event(second)
        async with http.get(site.url(path="/api/stream")) as third:
            assert third.status == 503
            assert "web.max_clients" in await third.text()
        assert svc.web.stats.streams_refused == 1
        # Updates keep coming, one a second.
        t0 = time.monotonic()
        for _ in range(2):
            assert b'"node_id":"n1"' in await read_event(first)
        assert 0.5 < time.monotonic() - t0 < 3.0
        first.close()
        second.close()
        await wait_until(lambda: svc.web is not None and svc.web.streams == 0, 5.0, "the streams closed")
        async with http.get(site.url(path="/api/stream")) as again:
            assert again.status == 200


async def test_a_client_that_never_reads_is_dropped_without_stalling_the_controller(site: WebSite) -> None:
    # 400 racks make each update about 60 KB: a stream nobody reads fills the socket buffers quickly.
    svc = await site.start(racks=400)
    site.publishing.add("rack-01")
    web = svc.web
    assert web is not None
    await admitted(site, svc, 1)
    sets_before, skipped_before = svc.stats.heartbeat_sets, svc.stats.heartbeats_skipped

    lag_s: list[float] = []

    async def probe() -> None:  # how late the shared event loop runs a 10 ms sleep
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.01)
            lag_s.append(time.monotonic() - t - 0.01)

    prober = asyncio.create_task(probe())
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(stuck, ("127.0.0.1", web.port))
        stuck.send(b"GET /api/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            reader = await http.get(site.url(path="/api/stream"))
            read = 0
            started = time.monotonic()
            while web.stats.slow_clients_dropped == 0 and time.monotonic() - started < 40.0:
                await read_event(reader)  # a page that keeps up meanwhile
                read += 1
                assert web.streams <= 2
            took_s = time.monotonic() - started
            assert web.stats.slow_clients_dropped == 1, "the stuck client was never dropped"
            assert read >= int(took_s) - 2  # the reading page missed (almost) nothing
            assert b'"racks":[' in await read_event(reader)  # and still gets updates
            reader.close()
    finally:
        prober.cancel()
        stuck.close()
    await asyncio.gather(prober, return_exceptions=True)
    await wait_until(lambda: web.streams == 0, 5.0, "both streams gone")
    # What the stuck client could hold: its queue (shared bytes) and the transport's buffer.
    assert web.stats.updates_skipped >= 1 and CLIENT_QUEUE == 2
    assert web.stats.max_write_buffer_bytes < 1024 * 1024
    assert took_s >= WRITE_TIMEOUT_S
    # The control loop never waited for it: heartbeats on time, the loop never late by much.
    assert svc.stats.heartbeats_skipped == skipped_before
    assert svc.stats.heartbeat_sets - sets_before >= int(took_s / 0.2) - 3
    assert max(lag_s) < 0.15, f"event loop late by {max(lag_s) * 1000:.0f} ms"


async def test_after_a_restart_the_events_come_back_from_the_journal(
    site: WebSite, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bmslink.journal")
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    svc = await site.start(racks=2, state_dir=state_dir)
    site.publishing.add("rack-01")
    await admitted(site, svc, 1)
    await asyncio.sleep(0.3)  # the journal is written on the state database's writer thread
    await site.stop(1)
    site.publishing.clear()  # the new controller sees no rack: what it shows of rack-01 is journaled history
    restarted_s = time.time()

    again = await site.start(racks=2, state_dir=state_dir)
    assert again.web is not None
    events = (await get_json(site.url(path="/api/events")))["events"]
    assert any(e["kind"] == "rack_state" and e["rack_id"] == "rack-01" and "stale -> ok" in e["text"]
               and e["timestamp_s"] < restarted_s for e in events)
    again.web.on_event(b"\xc1 not msgpack")  # never a crash: counted
    assert again.web.stats.events_undecodable == 1
