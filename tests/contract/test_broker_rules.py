"""The broker's rules, proven on a real Mosquitto started with the shipped configuration
(deploy/mosquitto/bmslink.conf and acl.example, paths and port adapted, a password file made with
mosquitto_passwd): who may publish what, anonymous clients refused, and the operator tools honouring
credentials and saying when they are refused."""

from __future__ import annotations

import asyncio
import os
import pwd
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from bmslink.processes import MosquittoBroker
from shared.config import MqttConfig
from shared.mqtt import Message, MqttSession
from shared.topics import Topics

REPO = Path(__file__).resolve().parents[2]
SITE = "site-a"
PREFIX = "bmslink"
USERS = ("rack-01", "rack-02", "ctl-a", "ctl-b", "operator")
TOPICS = Topics(PREFIX, SITE)
# session_of(user, *, subscribe=(), got=None, secret=None): a started session as that user.
SessionOf = Callable[..., Awaitable[MqttSession]]


def password(user: str) -> str:
    return f"pw-{user}-{len(user)}"


def _readable_by_broker(path: Path) -> None:
    """The broker reads its files after dropping root for user mosquitto."""
    if os.geteuid() == 0:
        for name in ("mosquitto", "nobody"):
            try:
                user = pwd.getpwnam(name)
            except KeyError:
                continue
            os.chown(path, user.pw_uid, user.pw_gid)
            return


@pytest.fixture(scope="module")
def site_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    files = Path(tempfile.mkdtemp(prefix="bmslink-broker-rules-"))
    files.chmod(0o755)
    passwd, acl = files / "bmslink.passwd", files / "bmslink.acl"
    for i, user in enumerate(USERS):
        create = ["-c"] if i == 0 else []
        subprocess.run(["mosquitto_passwd", "-b", *create, str(passwd), user, password(user)],
                       check=True, capture_output=True)
    acl.write_text((REPO / "deploy/mosquitto/acl.example").read_text())
    for path in (passwd, acl):
        path.chmod(0o600)
        _readable_by_broker(path)
    lines = []
    for shipped in (REPO / "deploy/mosquitto/bmslink.conf").read_text().splitlines():
        if shipped.startswith(("persistence ", "autosave_interval ")):
            continue  # where retained messages are kept is not what this test is about
        if shipped.startswith("password_file "):
            lines.append(f"password_file {passwd}")
        elif shipped.startswith("acl_file "):
            lines.append(f"acl_file {acl}")
        elif shipped.startswith("listener 1883 "):
            lines.append("listener {port} 127.0.0.1")
        else:
            lines.append(shipped)
    assert any(line.startswith("acl_file ") for line in lines) and "allow_anonymous false" in lines
    broker = MosquittoBroker(tmp_path_factory.mktemp("site-broker"), site_config=lines)
    broker.start()
    try:
        yield broker
    finally:
        broker.close()
        for path in (passwd, acl):
            path.unlink()
        files.rmdir()


def config(broker: MosquittoBroker, user: str | None, secret: str | None = None) -> MqttConfig:
    return MqttConfig(host="127.0.0.1", port=broker.port, topic_prefix=PREFIX, username=user,
                      password=secret if secret is not None else (password(user) if user else None),
                      protocol="3.1.1", reconnect_min_s=0.2, reconnect_max_s=0.5)


@pytest.fixture
async def session_of(site_broker: MosquittoBroker) -> AsyncIterator[SessionOf]:
    sessions: list[MqttSession] = []

    async def make(user: str | None, *, subscribe: tuple[str, ...] = (), got: list[Message] | None = None,
                   secret: str | None = None) -> MqttSession:
        def on_message(message: Message) -> None:
            if got is not None:
                got.append(message)

        session = MqttSession(config(site_broker, user, secret), user or "anonymous", on_message=on_message)
        for topic in subscribe:
            session.subscribe(topic, qos=1)
        sessions.append(session)
        await session.start()
        return session

    yield make
    for session in sessions:
        await session.stop()


async def _heard(got: list[Message], topic: str, seconds: float = 0.8) -> bool:
    await asyncio.sleep(seconds)
    return any(message.topic == topic for message in got)


async def test_anonymous_and_wrong_passwords_are_refused(session_of: SessionOf) -> None:
    anonymous = await session_of(None)
    wrong = await session_of("operator", secret="guess")
    assert not await anonymous.wait_connected(1.5) and not await wrong.wait_connected(0.1)
    assert anonymous.stats.connect_failures >= 1 and wrong.stats.connect_failures >= 1
    assert "connect failed" in wrong.stats.last_disconnect_reason


async def test_an_agent_publishes_its_own_rack_and_nothing_else(session_of: SessionOf) -> None:
    got: list[Message] = []
    controller = await session_of("ctl-a", subscribe=(f"{PREFIX}/{SITE}/#",), got=got)
    agent = await session_of("rack-01")
    assert await controller.wait_connected(5) and await agent.wait_connected(5)
    await asyncio.sleep(0.3)
    agent.publish(TOPICS.rack_telemetry("rack-01"), b"own", qos=1)
    assert await _heard(got, TOPICS.rack_telemetry("rack-01"))
    for topic in (TOPICS.rack_telemetry("rack-02"), TOPICS.command_request, TOPICS.leader,
                  TOPICS.cluster_state, TOPICS.latches, TOPICS.command_reply("0123456789")):
        agent.publish(topic, b"forged", qos=1)
        assert not await _heard(got, topic, 0.4), f"rack-01 could publish on {topic}"


async def test_controllers_and_the_operator_do_what_they_must(session_of: SessionOf) -> None:
    got_operator: list[Message] = []
    got_controller: list[Message] = []
    operator = await session_of("operator", subscribe=(f"{PREFIX}/{SITE}/#",), got=got_operator)
    controller = await session_of("ctl-b", subscribe=(TOPICS.command_request, TOPICS.all_command_replies,
                                                      TOPICS.latches), got=got_controller)
    assert await operator.wait_connected(5) and await controller.wait_connected(5)
    await asyncio.sleep(0.3)
    operator.publish(TOPICS.command_request, b"signed", qos=1)
    assert await _heard(got_controller, TOPICS.command_request)
    for topic in (TOPICS.cluster_state, TOPICS.leader, TOPICS.latches, TOPICS.command_reply("0123456789"),
                  TOPICS.controller_status("ctl-b")):
        controller.publish(topic, b"x", qos=1)
        assert await _heard(got_operator, topic), f"ctl-b could not publish on {topic}"
    operator.publish(TOPICS.leader, b"forged", qos=1)  # the operator may command, not lead
    got_operator.clear()
    assert not await _heard(got_controller, TOPICS.leader, 0.4)


def test_the_operator_tools_take_credentials_and_exit_non_zero_when_refused(site_broker: MosquittoBroker,
                                                                            tmp_path: Path) -> None:
    secret = tmp_path / "operator.password"
    secret.write_text(password("operator") + "\n")
    base = [sys.executable, "-m", "bmslink", "monitor", "--once", "--port", str(site_broker.port),
            "--site", SITE]
    ok = subprocess.run([*base, "--username", "operator", "--password-file", str(secret)],
                        capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    env = {**os.environ, "BMSLINK_MQTT_PASSWORD": password("operator")}
    from_env = subprocess.run([*base, "--username", "operator"], capture_output=True, text=True, timeout=60,
                              check=False, env=env)
    assert from_env.returncode == 0, from_env.stderr
    for refused in ([*base], [*base, "--username", "operator", "--password-file", str(tmp_path / "none")],
                    [*base, "--username", "rack-01", "--password-file", str(secret)]):
        out = subprocess.run(refused, capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode != 0, (refused, out.stdout)
        assert "Traceback" not in out.stderr


async def test_a_controller_reads_its_broker_password_from_a_file_or_the_environment(
    site_broker: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from controller.service import ControllerService  # noqa: PLC0415
    from shared.config import validate_config  # noqa: PLC0415
    from shared.controller_config import ControllerConfig  # noqa: PLC0415

    secret = tmp_path / "ctl-a.password"
    secret.write_text(password("ctl-a") + "\n")
    secret.chmod(0o600)
    monkeypatch.setenv("CTL_A_MQTT_PASSWORD", password("ctl-a"))
    for source in ({"password_file": str(secret)}, {"password_env": "CTL_A_MQTT_PASSWORD"}):
        config = validate_config({
            "site_id": SITE, "node_id": "ctl-a",
            "mqtt": {"host": "127.0.0.1", "port": site_broker.port, "username": "ctl-a", **source},
            "roster": [{"rack_id": "rack-01", "capacity_ah": 280}],
            "can": {"interface": "virtual", "channel": f"pw-{site_broker.port}"},
        }, ControllerConfig, "<test>")
        service = ControllerService(config)
        await service.start()
        try:
            assert await service.mqtt.wait_connected(5), source
        finally:
            await service.stop()


@pytest.mark.parametrize(("mqtt", "says"), [
    ({"username": "u", "password": "p", "password_env": "X"}, "give one of password"),
    ({"username": "u", "password_env": "BMSLINK_TEST_UNSET_VARIABLE"}, "is empty or not set"),
    ({"username": "u", "password_file": "/nonexistent/secret"}, "cannot read it"),
])
def test_a_password_source_that_cannot_be_used_is_a_config_error(mqtt: dict[str, str], says: str) -> None:
    from shared.config import ConfigError, validate_config  # noqa: PLC0415

    with pytest.raises(ConfigError, match=says):
        validate_config(mqtt, MqttConfig, "<test>")
