"""Whether this process can open the serial devices its serial links (Modbus RTU, Pylontech console) name.

A device that is missing or that this user may not open makes the link fail with
``connection_refused`` at every reconnect, which says nothing about why. Checked when the config is
checked (``bmslink agent --check-config``) and at agent start, this says which device, what is wrong
with it, and what to do. A warning, not an error: a USB adapter may be plugged in after the agent
starts, and the agent keeps trying.

pyserial URLs (``socket://``, ``rfc2217://``, ...) name no local device and are not checked.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass

from shared.agent_config import AgentConfig, ModbusRtuLink, PylontechConsoleLink

URL_MARKER = "://"
SERIAL_GROUP = "dialout"  # Debian/Ubuntu's group for serial ports
_GROUP_RW = stat.S_IRGRP | stat.S_IWGRP


@dataclass(frozen=True, slots=True)
class SerialProblem:
    """One device this process cannot use; ``reason`` and ``advice`` are written for the installer."""

    link: str
    device: str
    reason: str
    advice: str

    def __str__(self) -> str:
        return f"link {self.link}: serial device {self.device} {self.reason}. {self.advice}"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _user() -> str:
    return _user_name(os.geteuid())


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def _by_id_hint(device: str) -> str:
    if device.startswith("/dev/serial/by-id/"):
        return "ls -l /dev/serial/by-id/ lists the adapters present."
    return "Name the adapter by its stable path (ls -l /dev/serial/by-id/), which survives re-plugging."


SerialLink = ModbusRtuLink | PylontechConsoleLink


def device_problem(link: SerialLink) -> SerialProblem | None:
    """What keeps this process from opening ``link.device``, or None if it can (or it is a URL)."""
    device = link.device
    if URL_MARKER in device:
        return None
    try:
        info = os.stat(device)  # follows symlinks: /dev/serial/by-id/... names the real tty
    except FileNotFoundError:
        return SerialProblem(
            link.name, device, "does not exist",
            f"Is the adapter plugged in and its driver loaded (dmesg | tail)? {_by_id_hint(device)}",
        )
    except PermissionError as exc:
        return SerialProblem(
            link.name, device, f"cannot be examined by user {_user()} ({exc.strerror})",
            "Check the permissions of the directories on its path.",
        )
    except OSError as exc:
        return SerialProblem(link.name, device, f"cannot be examined ({exc.strerror})",
                             "Check the path in the config.")
    if not stat.S_ISCHR(info.st_mode):
        return SerialProblem(
            link.name, device, "is not a character device (a serial port is one)",
            f"Check the path in the config. {_by_id_hint(device)}",
        )
    if not os.access(device, os.R_OK | os.W_OK):
        group = _group_name(info.st_gid)
        user = _user()
        udev = (
            f"a udev rule, e.g. in /etc/udev/rules.d/70-bmslink-serial.rules: SUBSYSTEM==\"tty\", "
            f'ATTRS{{idVendor}}=="<vid>", ATTRS{{idProduct}}=="<pid>", GROUP="{SERIAL_GROUP}", MODE="0660" '
            f"(udevadm info -a {device} shows the ids), then udevadm control --reload && udevadm trigger"
        )
        if info.st_mode & _GROUP_RW == _GROUP_RW:
            advice = (
                f"Add the user to group {group} (usermod -aG {group} {user}, then log in again or restart "
                f"the service; the bmslink units run with SupplementaryGroups={SERIAL_GROUP}), or give the "
                f"adapter {udev}"
            )
        else:
            advice = f"Its group may not read and write it either: give the adapter {udev}"
        return SerialProblem(
            link.name, device,
            f"is not readable and writable by user {user} (it is {stat.filemode(info.st_mode)}, owner "
            f"{_user_name(info.st_uid)}, group {group})",
            advice,
        )
    return None


def serial_access_warnings(config: AgentConfig) -> list[str]:
    """One message per serial device (of a Modbus RTU or Pylontech console link) this process could
    not open."""
    problems = (device_problem(link) for link in config.links if isinstance(link, SerialLink))
    return [str(p) for p in problems if p is not None]
