"""What a release carries and an installer uses: the version from one source (``bmslink --version``), the
license, the changelog's format, the systemd units, and the sample configurations of deploy/etc/ —
each checked with ``--check-config`` through the CLI, and run against Mosquitto started with the
shipped broker configuration (deploy/mosquitto/), so the samples' accounts are the ACL's."""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import bmslink
from bmslink.processes import MosquittoBroker, ProcessGroup, bmslink_cli, free_port
from shared.config import MqttConfig
from shared.mqtt import Message, MqttSession
from shared.topics import Topics
from tests.agent.helpers import wait_until
from tests.contract.test_broker_rules import password, site_broker  # noqa: F401 - a fixture

REPO = Path(__file__).resolve().parents[1]
ETC = REPO / "deploy" / "etc"
SAMPLES = {"agent-rack-01.toml": "agent", "controller-ctl-a.toml": "controller",
           "controller-ctl-b.toml": "controller"}
# The Apache License 2.0 as apache.org publishes it (LICENSE-2.0.txt; Debian's
# /usr/share/common-licenses/Apache-2.0 and many projects' LICENSE files carry the same bytes).
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def pyproject() -> dict[str, object]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# -- version, license, changelog -----------------------------------------------------------------------------


def test_version_has_one_source_and_the_cli_prints_it() -> None:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    version = project["version"]
    assert bmslink.__version__ == version
    for argv in (bmslink_cli("--version"), [sys.executable, "-m", "bmslink", "--version"]):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"bmslink {version}"


def test_license_is_the_apache_2_text_pyproject_names() -> None:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    assert project["license"] == {"text": "Apache-2.0"}
    text = (REPO / "LICENSE").read_bytes()
    assert hashlib.sha256(text).hexdigest() == APACHE_2_SHA256
    debian = Path("/usr/share/common-licenses/Apache-2.0")
    if debian.is_file():
        assert text == debian.read_bytes()


def test_changelog_keeps_a_changelog() -> None:
    text = (REPO / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog\n")
    assert "https://keepachangelog.com/en/1.1.0/" in text
    releases = re.findall(r"^## \[([^\]]+)\](.*)$", text, flags=re.MULTILINE)
    assert releases and releases[0][0] == "Unreleased"
    for name, rest in releases[1:]:
        assert re.fullmatch(r"\d+\.\d+\.\d+", name) and re.fullmatch(r" - \d{4}-\d{2}-\d{2}", rest), name
    kinds = set(re.findall(r"^### (.+)$", text, flags=re.MULTILINE))
    assert kinds and kinds <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}


# -- systemd units -------------------------------------------------------------------------------------------


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.mark.parametrize("kind", ["agent", "controller"])
def test_units_are_notify_services_with_a_watchdog_and_credentials(kind: str, tmp_path: Path) -> None:
    unit = REPO / "deploy" / "systemd" / f"bmslink-{kind}@.service"
    s = unit_settings(unit)
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    watchdog_s = int(s["WatchdogSec"][0].removesuffix("s"))
    # The loop's slowest normal round: the controller cycles every 0.1 s, an agent polls a unit within
    # polling.request_timeout_ms (< interval_ms <= 1 s); a ping goes out every WatchdogSec / 2.
    assert 2 <= watchdog_s <= 30
    assert s["Restart"] == ["on-failure"] and s["RestartPreventExitStatus"] == ["2"]
    assert "bmslink-mqtt-password:/etc/bmslink/mqtt-password-%i" in s["LoadCredential"]
    if kind == "controller":
        assert "bmslink-command-keys:/etc/bmslink/command-keys.toml" in s["LoadCredential"]
    assert f"/etc/bmslink/{kind}-%i.toml" in s["ExecStart"][0]
    assert not any("can0-setup" in v for v in s["After"])  # the CAN units are can-setup@ / slcan@ now
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    # systemd's own parser: no unknown key, no bad value (the binary swapped for one that exists here).
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/opt/bmslink/.venv/bin/bmslink", "/bin/true"))
    out = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / f"bmslink-{kind}@x.service")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


# -- sample configurations -----------------------------------------------------------------------------------

CREDENTIALS = re.compile(r"/run/credentials/bmslink-(agent|controller)@([a-z0-9-]+)\.service/")


def installed_sample(name: str, root: Path, *, broker_port: int = 1883) -> Path:
    """A copy of sample ``name`` with the gateway's paths moved under ``root``: the credential the unit
    hands over (made here, with the broker password test_broker_rules gives each user), the state
    directory; the metrics port made free, the broker port ``broker_port``. Any other absolute path
    in the sample fails this test: it would be one the installer must provide and nobody checked."""
    text = (ETC / name).read_text()
    for match in set(CREDENTIALS.findall(text)):
        instance = match[1]
        directory = root / "credentials" / instance
        directory.mkdir(parents=True, exist_ok=True)
        secret = directory / "bmslink-mqtt-password"
        secret.write_text(password(instance) + "\n")
        secret.chmod(0o600)
    text = CREDENTIALS.sub(lambda m: f"{root}/credentials/{m.group(2)}/", text)
    (root / "state").mkdir(exist_ok=True)
    text = text.replace('state_dir = "/var/lib/bmslink"', f'state_dir = "{root}/state"')
    text = re.sub(r"^port = 91\d\d", f"port = {free_port()}", text, flags=re.MULTILINE)
    text = re.sub(r"^port = 1883$", f"port = {broker_port}", text, flags=re.MULTILINE)
    for path in re.findall(r'"(/[^"]*)"', text):
        assert path.startswith((str(root), "/dev/serial/by-id/")), f"{name}: {path} is not provided"
    copy = root / name
    copy.write_text(text)
    return copy


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_each_sample_passes_check_config(name: str, tmp_path: Path) -> None:
    kind = SAMPLES[name]
    data = tomllib.loads((ETC / name).read_text())
    assert (name.removeprefix(f"{kind}-").removesuffix(".toml")
            == data["rack_id" if kind == "agent" else "node_id"] == data["mqtt"]["username"])
    copy = installed_sample(name, tmp_path)
    out = subprocess.run(bmslink_cli(kind, "--config", str(copy), "--check-config"),
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{copy}: ok (site site-a, ")


def test_the_controller_pair_differs_only_where_two_nodes_must() -> None:
    a, b = (tomllib.loads((ETC / f"controller-ctl-{n}.toml").read_text()) for n in "ab")
    assert a["failover"]["enabled"] and b["failover"]["enabled"]
    assert a["failover"]["node_number"] != b["failover"]["node_number"]
    assert a["failover"]["rank"] != b["failover"]["rank"]
    assert a["metrics"]["port"] != b["metrics"]["port"]
    same = {k for k in a if k not in ("node_id", "mqtt", "failover", "metrics")}
    assert {k: a[k] for k in same} == {k: b[k] for k in same}


async def test_the_samples_run_against_the_shipped_broker_configuration(
    site_broker: MosquittoBroker, tmp_path: Path  # noqa: F811 - the imported fixture
) -> None:
    """Each sample, started as its unit would start it, logs in with its own account and publishes its
    status where the shipped ACL lets it; the operator (acl.example) sees all three. Neither the serial
    adapter nor can0 exists here: the agent polls in vain and the controller retries the bus, which is
    all the broker needs."""
    got: list[Message] = []
    topics = Topics("bmslink", "site-a")
    operator = MqttSession(MqttConfig(host="127.0.0.1", port=site_broker.port, username="operator",
                                      password=password("operator"), protocol="3.1.1"), "operator",
                           on_message=got.append)
    operator.subscribe("bmslink/site-a/#", qos=1)
    await operator.start()
    procs = ProcessGroup(tmp_path / "procs")
    try:
        assert await operator.wait_connected(5)
        for name, kind in SAMPLES.items():
            procs.start(name, bmslink_cli(kind, "--config", str(
                installed_sample(name, tmp_path, broker_port=site_broker.port))))
        wanted = {topics.rack_status("rack-01"), topics.controller_status("ctl-a"),
                  topics.controller_status("ctl-b")}
        await wait_until(lambda: wanted <= {m.topic for m in got}, 30,
                         f"every sample's status on the broker\n{procs.describe()}")
        assert [m.payload for m in got if m.topic == topics.rack_status("rack-01")][-1] == b"online"
        await asyncio.sleep(0.5)
        for name in SAMPLES:
            assert procs.running(name), procs.describe()
            assert "not authorized" not in procs.stderr(name).lower(), procs.stderr(name)
    finally:
        procs.stop_all()
        await operator.stop()



# -- the rolling upgrade -------------------------------------------------------------------------------------

UPGRADE = REPO / "deploy" / "upgrade.sh"


def upgrade(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(UPGRADE), *args], capture_output=True, text=True, timeout=120,
                          check=False)


PAIR_TOML = """\
site_id = "site-u"
node_id = "{node}"

[mqtt]
host = "127.0.0.1"
port = {broker}
topic_prefix = "{prefix}"

[[roster]]
rack_id = "rack-01"
capacity_ah = 280

[can]
interface = "remote"
channel = "{channel}"

[failover]
enabled = true
node_number = {number}
rank = {rank}
heartbeat_period_ms = 100

[metrics]
enabled = true
host = "127.0.0.1"
port = {metrics}
"""


def role_of(port: int) -> str | None:
    """The role a controller's metrics endpoint reports (None while it does not answer)."""
    import urllib.request  # noqa: PLC0415

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    found = re.search(r'^bmslink_controller_role\{role="(\w+)"\} 1\.0$', text, flags=re.MULTILINE)
    return found.group(1) if found else None


async def test_upgrade_dry_run_plans_standby_first_then_a_handover_then_the_agents(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str, tmp_path: Path
) -> None:
    """A real failover pair (two controller processes on a python-can-remote bus, metrics on), ctl-a
    active and ctl-b standby: the dry run reads their roles from the metrics endpoints and prints the
    rolling plan in order, touching nothing."""
    from bmslink.processes import CanBridge  # noqa: PLC0415

    etc = tmp_path / "etc"
    etc.mkdir()
    bridge = CanBridge(tmp_path / "can")
    await asyncio.to_thread(bridge.start)
    procs = ProcessGroup(tmp_path / "procs")
    ports = {"ctl-a": free_port(), "ctl-b": free_port()}
    try:
        for number, node in enumerate(("ctl-a", "ctl-b"), start=1):
            (etc / f"controller-{node}.toml").write_text(PAIR_TOML.format(
                node=node, broker=mqtt_broker.port, prefix=unique_topic_prefix, channel=bridge.channel,
                number=number, rank=number - 1, metrics=ports[node]))
            procs.start(node, bmslink_cli("controller", "--config", str(etc / f"controller-{node}.toml")))
            want = "active" if node == "ctl-a" else "standby"
            await wait_until(lambda n=node, w=want: role_of(ports[n]) == w, 30,  # type: ignore[misc]
                             f"{node} {want}\n{procs.describe()}")
        installed_sample("agent-rack-01.toml", etc)
        tarball = tmp_path / "bmslink-new.tar.gz"
        tarball.write_bytes(b"")  # a dry run never opens it
        out = await asyncio.to_thread(
            upgrade, "--dry-run", "--tarball", str(tarball), "--prefix", str(REPO), "--etc", str(etc),
            "--controller", "ctl-a", "--controller", "ctl-b", "--agent", "rack-01", "--timeout", "30")
        assert out.returncode == 0, out.stderr + out.stdout
        lines = out.stdout.splitlines()
        assert f"  controller ctl-a (127.0.0.1:{ports['ctl-a']}): active, broker up, CAN up" in lines
        assert f"  controller ctl-b (127.0.0.1:{ports['ctl-b']}): standby, broker up, CAN up" in lines

        def at(fragment: str) -> int:
            found = [i for i, line in enumerate(lines) if fragment in line]
            assert len(found) == 1, (fragment, out.stdout)
            return found[0]

        order = [
            at(f"+ tar -xzf {tarball} -C "),
            at("/.venv/bin/pip install --quiet"),
            at(f"controller --check-config --config {etc}/controller-ctl-a.toml"),
            at(f"controller --check-config --config {etc}/controller-ctl-b.toml"),
            at(f"agent --check-config --config {etc}/agent-rack-01.toml"),
            at("+ systemctl daemon-reload"),
            at("+ systemctl restart bmslink-controller@ctl-b"),
            at("(would wait up to 30 s until controller ctl-b is back as a healthy standby)"),
            at("+ systemctl stop bmslink-controller@ctl-a"),
            at("(would wait up to 30 s until a standby has taken over)"),
            at("+ systemctl start bmslink-controller@ctl-a"),
            at("(would wait up to 30 s until controller ctl-a is back as a healthy standby)"),
            at("+ systemctl restart bmslink-agent@rack-01"),
        ]
        assert order == sorted(order), out.stdout
        assert "restart bmslink-controller@ctl-a" not in out.stdout  # the active is handed over, not bounced
        assert lines[-1] == "==> done (dry run: nothing was changed)"
        # Nothing was touched: both still run, in the roles they had.
        assert procs.running("ctl-a") and procs.running("ctl-b")
        assert role_of(ports["ctl-a"]) == "active" and role_of(ports["ctl-b"]) == "standby"

        # ctl-a alone (its standby on another gateway, not named): a restart would leave a gap.
        alone = await asyncio.to_thread(
            upgrade, "--dry-run", "--git", "v9.9.9", "--prefix", str(REPO), "--etc", str(etc),
            "--controller", "ctl-a")
        assert alone.returncode == 1 and "--allow-gap" in alone.stderr, alone.stdout
        assert "systemctl" not in alone.stdout  # refused before any step that changes something
        # ... named as a peer, it is the standby that takes over.
        peer = await asyncio.to_thread(
            upgrade, "--dry-run", "--git", "v9.9.9", "--prefix", str(REPO), "--etc", str(etc),
            "--controller", "ctl-a", "--peer", f"127.0.0.1:{ports['ctl-b']}")
        assert peer.returncode == 0, peer.stderr
        assert f"  peer 127.0.0.1:{ports['ctl-b']}: standby, broker up, CAN up" in peer.stdout
        assert f"+ git -C {REPO} checkout --detach v9.9.9" in peer.stdout
        assert "+ systemctl stop bmslink-controller@ctl-a" in peer.stdout
        # ... and the script refuses to upgrade this gateway while the peer is the active.
        backwards = await asyncio.to_thread(
            upgrade, "--dry-run", "--git", "v9.9.9", "--prefix", str(REPO), "--etc", str(etc),
            "--controller", "ctl-b", "--peer", f"127.0.0.1:{ports['ctl-a']}")
        assert backwards.returncode == 1 and "upgrade its gateway last" in backwards.stderr
        # --allow-gap: the lone active is restarted, said as a warning.
        gap = await asyncio.to_thread(
            upgrade, "--dry-run", "--git", "v9.9.9", "--prefix", str(REPO), "--etc", str(etc),
            "--controller", "ctl-a", "--allow-gap")
        assert gap.returncode == 0 and "warning: no standby" in gap.stdout
        assert "+ systemctl restart bmslink-controller@ctl-a" in gap.stdout
    finally:
        procs.stop_all()
        await asyncio.to_thread(bridge.stop)


@pytest.mark.parametrize(("args", "message"), [
    ((), "give the new code"),
    (("--git", "v1", "--tarball", "x.tar.gz"), "give the new code"),
    (("--git",), "--git needs a value"),
    (("--git", "v1", "--frobnicate"), "unknown argument: --frobnicate"),
    (("--git", "v1", "--timeout", "soon"), "--timeout takes whole seconds"),
    (("--git", "v1", "--peer", "just-a-host"), "--peer takes HOST:PORT"),
    (("--tarball", "/nonexistent/bmslink.tar.gz"), "no such file"),
    (("--git", "v1", "--prefix", "/nonexistent"), "not found: is bmslink installed"),
    (("--git", "v1", "--controller", "ctl-z"), "controller-ctl-z.toml: no such file"),
    (("--git", "v1", "--agent", "rack-99"), "agent-rack-99.toml: no such file"),
])
def test_upgrade_refuses_what_it_cannot_do_with_status_2(args: tuple[str, ...], message: str,
                                                          tmp_path: Path) -> None:
    extra = [] if "--prefix" in args else ["--prefix", str(REPO)]
    out = upgrade(*args, *extra, "--etc", str(tmp_path), "--dry-run")
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr
    assert "systemctl" not in out.stdout and "+ " not in out.stdout


def test_upgrade_needs_the_metrics_endpoint_of_each_controller(tmp_path: Path) -> None:
    text = (ETC / "controller-ctl-a.toml").read_text().replace("[metrics]", "[metrics_off]")
    (tmp_path / "controller-ctl-a.toml").write_text(re.sub(r"\[metrics_off\][^\[]*", "", text))
    out = upgrade("--dry-run", "--git", "v1", "--prefix", str(REPO), "--etc", str(tmp_path),
                  "--controller", "ctl-a")
    assert out.returncode == 2 and "[metrics] is not enabled" in out.stderr
    assert upgrade("--help").returncode == 0
