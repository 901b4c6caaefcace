"""The shared fixtures do what the suite relies on: real brokers, pty pairs, subprocesses, leak checks."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bmslink import processes as procs_module
from tests.conftest import BrokerFactory
from tests.fixtures.broker import LOOPBACK, BrokerError, MosquittoBroker, free_port
from tests.fixtures.procs import ProcessError, ProcessGroup
from tests.fixtures.serial_pair import SerialPair

WAIT_S = 5.0
# MQTT 3.1.1 CONNECT, clean session, keep-alive 60 s, client id "probe"; the broker answers CONNACK 0x20.
_RAW_CONNECT = bytes([0x10, 17, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 60, 0, 5]) + b"probe"
_CONNACK = 0x20


@contextmanager
def paho_client(broker: MosquittoBroker) -> Iterator[tuple[mqtt.Client, queue.Queue[mqtt.MQTTMessage]]]:
    """A connected paho 2.x MQTT v5 client with its network thread running, and the messages it receives."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    received: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    connected = threading.Event()
    client.on_connect = lambda _c, _u, _f, _rc, _p: connected.set()
    client.on_message = lambda _c, _u, msg: received.put(msg)
    client.connect(broker.host, broker.port, keepalive=5)
    client.loop_start()
    try:
        assert connected.wait(WAIT_S), "no CONNACK from the broker"
        yield client, received
    finally:
        client.disconnect()
        client.loop_stop()


def subscribe(client: mqtt.Client, topic: str) -> None:
    """Subscribe at QoS 1 and wait for the SUBACK, so that a publish right after cannot overtake it."""
    acked = threading.Event()
    client.on_subscribe = lambda _c, _u, _mid, _codes, _p: acked.set()
    client.subscribe(topic, qos=1)
    assert acked.wait(WAIT_S), "no SUBACK from the broker"


def round_trip(broker: MosquittoBroker, topic: str, payload: bytes) -> None:
    with paho_client(broker) as (client, received):
        subscribe(client, topic)
        client.publish(topic, payload, qos=1).wait_for_publish(WAIT_S)
        message = received.get(timeout=WAIT_S)
    assert (message.topic, message.payload) == (topic, payload)


def mqtt_connack_within(broker: MosquittoBroker, timeout_s: float) -> bool:
    """Whether a raw MQTT CONNECT to the broker is answered within ``timeout_s``."""
    with socket.create_connection((broker.host, broker.port), timeout=WAIT_S) as sock:
        sock.sendall(_RAW_CONNECT)
        sock.settimeout(timeout_s)
        try:
            return sock.recv(4)[:1] == bytes([_CONNACK])
        except TimeoutError:
            return False


def test_free_port_is_bindable_on_loopback() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind((LOOPBACK, port))
    assert 1024 <= port <= 65535


def test_unique_topic_prefix_is_a_fresh_valid_prefix(unique_topic_prefix: str) -> None:
    assert re.fullmatch(r"t[0-9a-f]{8}", unique_topic_prefix)


def test_session_broker_round_trip(mqtt_broker: MosquittoBroker, unique_topic_prefix: str) -> None:
    assert mqtt_broker.host == "127.0.0.1"
    round_trip(mqtt_broker, f"{unique_topic_prefix}/site/rack/r1/telemetry", b"\x81\xa1v\x01")


def listening_addresses(port: int) -> set[str]:
    """Local addresses (kernel hex notation) of TCP sockets listening on ``port``, IPv4 and IPv6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: TCP_LISTEN
                found.add(address)
    return found


def test_session_broker_listens_on_loopback_only(mqtt_broker: MosquittoBroker) -> None:
    assert listening_addresses(mqtt_broker.port) == {"0100007F"}  # 127.0.0.1, little-endian


def test_broker_runs_unprivileged_when_started_as_root(private_broker: MosquittoBroker) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root makes mosquitto drop privileges")
    status = Path(f"/proc/{private_broker.pid}/status").read_text()
    uids = re.search(r"^Uid:\s+\d+\s+(\d+)", status, re.MULTILINE)  # real, effective, saved, fs
    assert uids is not None
    assert int(uids.group(1)) != 0, "mosquitto kept root privileges"
    round_trip(private_broker, "probe/root", b"x")


def test_private_broker_kill_and_restart_on_same_port(private_broker: MosquittoBroker) -> None:
    port = private_broker.port
    round_trip(private_broker, "probe/before", b"1")
    private_broker.kill()
    assert not private_broker.is_running()
    with pytest.raises(ConnectionRefusedError), socket.create_connection((LOOPBACK, port), timeout=1):
        pass
    private_broker.restart()
    assert private_broker.port == port
    round_trip(private_broker, "probe/after", b"2")


def test_restart_keeps_a_live_client_reconnecting_to_the_same_port(private_broker: MosquittoBroker) -> None:
    with paho_client(private_broker) as (client, received):
        reconnected = threading.Event()
        client.on_connect = lambda _c, _u, _f, _rc, _p: reconnected.set()
        client.reconnect_delay_set(min_delay=1, max_delay=1)
        private_broker.kill()
        private_broker.restart()
        assert reconnected.wait(WAIT_S), "paho did not reconnect to the restarted broker"
        subscribe(client, "probe/again")
        client.publish("probe/again", b"3", qos=1).wait_for_publish(WAIT_S)
        assert received.get(timeout=WAIT_S).payload == b"3"


def test_persistent_broker_keeps_retained_messages_across_restart(broker_factory: BrokerFactory) -> None:
    broker = broker_factory(persistence=True)
    with paho_client(broker) as (client, _received):
        client.publish("probe/leader", b"node-a", qos=1, retain=True).wait_for_publish(WAIT_S)
    broker.restart()  # SIGTERM saves the database
    with paho_client(broker) as (client, received):
        subscribe(client, "probe/leader")
        message = received.get(timeout=WAIT_S)
    assert (message.payload, message.retain) == (b"node-a", True)


def test_non_persistent_broker_forgets_retained_messages(private_broker: MosquittoBroker) -> None:
    with paho_client(private_broker) as (client, _received):
        client.publish("probe/leader", b"node-a", qos=1, retain=True).wait_for_publish(WAIT_S)
    private_broker.restart()
    with paho_client(private_broker) as (client, received):
        subscribe(client, "probe/leader")
        with pytest.raises(queue.Empty):
            received.get(timeout=0.3)


def test_paused_broker_accepts_tcp_but_does_not_answer(private_broker: MosquittoBroker) -> None:
    private_broker.pause()
    try:
        assert not mqtt_connack_within(private_broker, 0.3)
    finally:
        private_broker.resume()
    assert mqtt_connack_within(private_broker, WAIT_S)


def test_broker_start_failure_shows_the_log(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path, extra_config=["no_such_option 1"])
    with pytest.raises(BrokerError, match="no_such_option"):
        broker.start()
    assert not broker.is_running()


def test_broker_on_a_taken_fixed_port_fails_clearly(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind((LOOPBACK, 0))
        squatter.listen()
        broker = MosquittoBroker(tmp_path, port=squatter.getsockname()[1])
        with pytest.raises(BrokerError, match="Address already in use"):
            broker.start()


def read_exactly(fd: int, size: int) -> bytes:
    data = b""
    deadline = time.monotonic() + WAIT_S
    while len(data) < size:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        data += os.read(fd, size - len(data))
    return data


@contextmanager
def open_tty(path: str) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    try:
        yield fd
    finally:
        os.close(fd)


def test_serial_pair_carries_bytes_both_ways(serial_pair: SerialPair) -> None:
    frame = bytes(range(256))  # raw mode: no byte may be translated or eaten
    with open_tty(serial_pair.a) as a, open_tty(serial_pair.b) as b:
        os.write(a, frame)
        assert read_exactly(b, len(frame)) == frame
        os.write(b, b"\x01\x03\x00\x00\x00\x02\xc4\x0b")
        assert read_exactly(a, 8) == b"\x01\x03\x00\x00\x00\x02\xc4\x0b"


def test_serial_pair_survives_an_end_being_reopened(serial_pair: SerialPair) -> None:
    with open_tty(serial_pair.a) as a:
        os.write(a, b"first")
    with open_tty(serial_pair.a) as a, open_tty(serial_pair.b) as b:
        assert read_exactly(b, 5) == b"first"
        os.write(b, b"second")
        assert read_exactly(a, 6) == b"second"


def test_serial_pair_stop_unplugs_and_start_replugs(serial_pair: SerialPair) -> None:
    serial_pair.stop()
    assert not Path(serial_pair.a).exists()
    assert not Path(serial_pair.b).exists()
    serial_pair.start()
    with open_tty(serial_pair.a) as a, open_tty(serial_pair.b) as b:
        os.write(b, b"back")
        assert read_exactly(a, 4) == b"back"


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2] == "Z"


def test_process_group_stops_a_sleeping_child(procs: ProcessGroup) -> None:
    proc = procs.start("sleeper", ["sleep", "100"])
    assert proc.poll() is None
    codes = procs.stop_all()
    assert codes == {"sleeper": -signal.SIGINT}
    assert _gone(proc.pid)


def test_process_group_escalates_to_sigkill(procs: ProcessGroup, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(procs_module, "SIGINT_GRACE_S", 0.2)
    monkeypatch.setattr(procs_module, "SIGTERM_GRACE_S", 0.2)
    procs.start("stubborn", ["sh", "-c", "trap '' INT TERM; echo armed; while :; do sleep 0.05; done"])
    procs.wait_for_output("stubborn", "armed", WAIT_S)
    assert procs.stop("stubborn") == -signal.SIGKILL


def test_process_group_captures_output_and_kills_grandchildren(procs: ProcessGroup) -> None:
    procs.start("parent", ["sh", "-c", "sleep 100 & echo child=$!; echo to-stderr >&2; wait"])
    text = procs.wait_for_output("parent", "to-stderr", WAIT_S)
    match = re.search(r"child=(\d+)", text)
    assert match is not None
    grandchild = int(match.group(1))
    assert "to-stderr" in procs.stderr("parent")
    assert "to-stderr" not in procs.stdout("parent")
    procs.stop_all()
    deadline = time.monotonic() + WAIT_S
    while not _gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _gone(grandchild)


def test_process_group_reports_a_process_that_exits_early(procs: ProcessGroup) -> None:
    procs.start("crasher", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    with pytest.raises(ProcessError, match="boom"):
        procs.wait_for_output("crasher", "ready", WAIT_S)
    assert procs.wait("crasher", WAIT_S) == 3


def test_process_group_passes_extra_environment(procs: ProcessGroup) -> None:
    procs.start("env", ["sh", "-c", 'echo "value=$BMSLINK_TEST_VALUE"'], env={"BMSLINK_TEST_VALUE": "42"})
    assert procs.wait("env", WAIT_S) == 0
    assert "value=42" in procs.stdout("env")


async def test_async_test_ending_with_a_cancelled_task_is_clean() -> None:
    task = asyncio.create_task(asyncio.sleep(100))
    task.cancel()  # not awaited: the leak check gives it the loop turns it needs to finish


LEAKY_TESTS = """
import asyncio
import subprocess
import threading

import pytest


def test_leaks_a_thread():
    threading.Thread(target=threading.Event().wait, args=(30,), daemon=True, name="leaky-thread").start()


def test_leaks_a_child():
    subprocess.Popen(["sleep", "30"])


async def test_leaks_a_task():
    asyncio.create_task(asyncio.sleep(30), name="leaky-task")


async def test_leaks_a_task_from_a_fixture(task_fixture):
    pass


@pytest.fixture
async def task_fixture():
    yield asyncio.create_task(asyncio.sleep(30), name="fixture-task")


@pytest.mark.allow_leaks
def test_allowed_to_leak():
    threading.Thread(target=threading.Event().wait, args=(30,), daemon=True, name="allowed").start()


def test_joins_its_thread():
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()


def test_stops_its_child():
    proc = subprocess.Popen(["sleep", "30"])
    proc.terminate()
    proc.wait()
"""


@pytest.mark.slow
def test_leak_checks_fail_exactly_the_leaking_tests(tmp_path: Path) -> None:
    tests_dir = Path(__file__).parent
    inner = tmp_path / "inner"
    shutil.copytree(
        tests_dir / "fixtures", inner / "tests" / "fixtures", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(tests_dir / "conftest.py", inner / "tests" / "conftest.py")
    (inner / "tests" / "__init__.py").write_text("")
    (inner / "tests" / "test_leaky.py").write_text(textwrap.dedent(LEAKY_TESTS))
    (inner / "pytest.ini").write_text(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    report = tmp_path / "report.xml"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={report}", "tests"],
        cwd=inner,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    errors: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        for error in case.iter("error"):
            errors[case.attrib["name"]] = error.attrib.get("message", "") + (error.text or "")
    assert set(errors) == {
        "test_leaks_a_thread",
        "test_leaks_a_child",
        "test_leaks_a_task",
        "test_leaks_a_task_from_a_fixture",
    }, result.stdout + result.stderr
    assert "leaky-thread" in errors["test_leaks_a_thread"]
    assert "sleep 30" in errors["test_leaks_a_child"]
    assert "leaky-task" in errors["test_leaks_a_task"]
    assert "fixture-task" in errors["test_leaks_a_task_from_a_fixture"]
