"""Fixtures shared by the whole suite: real peers on 127.0.0.1 and a leak check around every test.

Peers: ``mqtt_broker`` (one Mosquitto for the session; never kill it), ``private_broker`` and
``broker_factory`` (brokers a test owns and may kill, pause or restart), ``unique_topic_prefix``
(isolates tests sharing the session broker), ``serial_pair`` (socat pty pair for Modbus RTU) and
``procs`` (our CLI and simulators as subprocesses).

Leaks: every test fails in its teardown if it leaves threads, child processes or (on the function
loop) asyncio tasks behind. ``@pytest.mark.allow_leaks`` exempts a test that hands such a resource
on purpose to something that outlives it.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import pytest

from bmslink.processes import MosquittoBroker, ProcessGroup
from tests.fixtures import leaks
from tests.fixtures.serial_pair import SerialPair

ALLOW_LEAKS_MARKER = "allow_leaks"

BrokerFactory = Callable[..., MosquittoBroker]


def pytest_configure(config: pytest.Config) -> None:
    # Registered here rather than in pyproject.toml so that the marker lives next to the check it disables.
    config.addinivalue_line(
        "markers",
        f"{ALLOW_LEAKS_MARKER}: skip the thread/process/task leak check (the test hands them on on purpose)",
    )
    # A run started in the background (`scripts/test &`) inherits SIGINT ignored, and an ignored signal
    # stays ignored across exec: every child would then sit out the harness's SIGINT and be stopped
    # by SIGTERM seconds later. A handler (unlike SIG_IGN) is reset to the default in each child.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _leak_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if threads or child processes it started outlive its teardown.

    Autouse fixtures are set up first and so torn down last: everything the test's own fixtures
    stop, including pytest-asyncio's event loop and its default executor, is gone before the check.
    """
    baseline = leaks.take_baseline()
    yield
    if request.node.get_closest_marker(ALLOW_LEAKS_MARKER) is None:
        try:
            leaks.check_threads_and_children(baseline)
        except leaks.LeakError as exc:
            failure = str(exc)
        else:
            return
        pytest.fail(failure, pytrace=False)


@pytest.fixture(autouse=True)
async def _task_leak_guard(_leak_guard: None, request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Fail the test if asyncio tasks are still pending on the function-scoped loop after its teardown.

    This async fixture runs on the same loop as an async test with the default (function) loop scope,
    and its teardown runs after the teardown of every fixture the test requested but before the loop
    closes, which would otherwise cancel leftover tasks silently. A test with a wider ``loop_scope``
    runs on another loop and is not covered: await ``leaks.assert_no_pending_tasks()`` there.
    """
    yield
    if request.node.get_closest_marker(ALLOW_LEAKS_MARKER) is None:
        try:
            await leaks.assert_no_pending_tasks()
        except leaks.LeakError as exc:
            failure = str(exc)
        else:
            return
        pytest.fail(failure, pytrace=False)


@pytest.fixture(scope="session")
def mqtt_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """One broker shared by the session: combine with ``unique_topic_prefix``; never stop or kill it."""
    broker = MosquittoBroker(tmp_path_factory.mktemp("mosquitto-session"))
    broker.start()
    assert broker.pid is not None
    leaks.expect_long_lived_child(broker.pid)
    yield broker
    broker.close()


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[BrokerFactory]:
    """Start extra brokers owned by the test: ``broker_factory(persistence=True, extra_config=[...])``.

    Takes the keyword arguments of :class:`MosquittoBroker` besides ``workdir``; every broker made is
    closed at teardown.
    """
    made: list[MosquittoBroker] = []

    def make(
        *, port: int | None = None, persistence: bool = False, extra_config: Sequence[str] = ()
    ) -> MosquittoBroker:
        broker = MosquittoBroker(
            tmp_path / f"mosquitto-{len(made)}", port=port, persistence=persistence, extra_config=extra_config
        )
        made.append(broker)
        broker.start()
        return broker

    yield make
    for broker in made:
        broker.close()


@pytest.fixture
def private_broker(broker_factory: BrokerFactory) -> MosquittoBroker:
    """A broker this test alone uses, free to ``kill()``, ``pause()`` and ``restart()`` on its port."""
    return broker_factory()


@pytest.fixture
def unique_topic_prefix() -> str:
    """A topic prefix no other test uses (``t`` + 8 hex digits), valid as ``mqtt.topic_prefix``."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def serial_pair(tmp_path: Path) -> Iterator[SerialPair]:
    """A running socat pty pair; ``.a`` and ``.b`` are the two device paths."""
    with SerialPair(tmp_path / "serial") as pair:
        yield pair


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    """Subprocesses for this test, all stopped at teardown (SIGINT, then SIGTERM, then SIGKILL).

    Their exit statuses and output tails are printed at teardown; pytest shows that only for a failed test.
    """
    group = ProcessGroup(tmp_path / "procs")
    yield group
    group.stop_all()
    report = group.describe()
    if report:
        print(report)
