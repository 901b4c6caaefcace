"""The operator command contract (shared/commands.py): signing, the envelope, key files."""

from __future__ import annotations

import json
from pathlib import Path

import msgpack
import pytest

from shared.commands import (
    KEY_BYTES,
    CommandAction,
    CommandRefusedError,
    KeyFileError,
    credential_path,
    decode_request,
    encode_request,
    load_keys,
    new_command,
    new_key,
    sign,
)

KEY = bytes(range(KEY_BYTES))


def _command(**overrides: object) -> bytes:
    command = new_command(CommandAction.CLEAR_LATCHES, key_id="alice", site_id="site-a", racks=("rack-01",))
    return encode_request(command.model_copy(update=overrides), KEY)


def test_a_signed_command_verifies_and_parses_back() -> None:
    command = new_command(CommandAction.CLEAR_LATCHES, key_id="alice", site_id="site-a", racks=("rack-01",))
    request = decode_request(encode_request(command, KEY))
    assert request.verify(KEY)
    assert request.command() == command
    assert request.claimed_id() == command.id


def test_the_signature_covers_every_byte_of_the_body() -> None:
    request = decode_request(_command())
    for i in range(len(request.body)):
        flipped = bytearray(request.body)
        flipped[i] ^= 0x01
        assert sign(bytes(flipped), KEY) != request.signature
    assert not decode_request(_command()).verify(bytes(KEY_BYTES))  # another key


@pytest.mark.parametrize(("payload", "reason"), [
    (b"", "malformed"),
    (b"\xc1", "malformed"),
    (msgpack.packb([1, 2]), "malformed"),
    (msgpack.packb({"v": 2, "key_id": "a", "body": b"{}", "signature": bytes(32)}), "unsupported_version"),
    (msgpack.packb({"v": 1, "key_id": "a", "body": "text", "signature": bytes(32)}), "malformed"),
    (msgpack.packb({"v": 1, "key_id": "a", "body": b"{}", "signature": bytes(31)}), "bad_signature"),
    (msgpack.packb({"v": 1, "key_id": "a", "body": b"{}", "signature": bytes(32), "x": 1}), "malformed"),
    (msgpack.packb({"v": 1, "key_id": 5, "body": b"{}", "signature": bytes(32)}), "malformed"),
    (b"\x91" * 100_000, "malformed"),  # too big and deeply nested
])
def test_what_is_not_a_signed_command_is_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(CommandRefusedError) as refused:
        decode_request(payload)
    assert refused.value.reason == reason


@pytest.mark.parametrize("body", [
    b"not json", b"\xff\xfe", b"[]", b'{"id": "x"}', b"[" * 10_000,
    b'{"id":"0123456789","key_id":"alice","site_id":"site-a","issued_s":"1","action":"clear_latches"}',
    b'{"id":"0123456789","key_id":"alice","site_id":"site-a","issued_s":1.0,"action":"force_everything"}',
    b'{"id":"0123456789","key_id":"bob","site_id":"site-a","issued_s":1.0,"action":"clear_latches"}',
])
def test_a_signed_body_that_is_not_a_command_is_refused(body: bytes) -> None:
    envelope = {"v": 1, "key_id": "alice", "body": body, "signature": sign(body, KEY)}
    request = decode_request(msgpack.packb(envelope))
    assert request.verify(KEY)
    with pytest.raises(CommandRefusedError) as refused:
        request.command()
    assert refused.value.reason == "malformed"


def test_only_a_well_formed_id_is_claimed_for_the_refusal() -> None:
    for claimed, expected in (("0123456789", "0123456789"), ("../../x/0123", None), ("short", None),
                              ("a/b#0123456", None), (5, None)):
        body = json.dumps({"id": claimed, "action": "anything"}).encode()
        request = decode_request(msgpack.packb({"v": 1, "key_id": "a", "body": body, "signature": bytes(32)}))
        assert request.claimed_id() == expected


def _key_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_key_file_gives_its_keys(tmp_path: Path) -> None:
    alice, bob = new_key(), new_key()
    keys = load_keys(_key_file(tmp_path, f'[keys]\nalice = "{alice}"\n"bob.ops" = "{bob}"\n'))
    assert keys == {"alice": bytes.fromhex(alice), "bob.ops": bytes.fromhex(bob)}


@pytest.mark.parametrize(("text", "mode", "says"), [
    (f'[keys]\nalice = "{"ab" * 32}"\n', 0o644, "chmod 600"),
    (f'[keys]\nalice = "{"ab" * 32}"\n', 0o620, "chmod 600"),
    ('[keys]\nalice = "abcd"\n', 0o600, "64 hex digits"),
    (f'[keys]\nalice = "{"zz" * 32}"\n', 0o600, "64 hex digits"),
    (f'[keys]\n"bad id!" = "{"ab" * 32}"\n', 0o600, "key id"),
    ("[keys]\n", 0o600, "[keys] table"),
    (f'alice = "{"ab" * 32}"\n', 0o600, "[keys] table"),
    ("[keys\n", 0o600, "keys.toml"),
])
def test_a_key_file_that_cannot_be_used_says_why(tmp_path: Path, text: str, mode: int, says: str) -> None:
    with pytest.raises(KeyFileError, match=says.replace("[", r"\[").replace("]", r"\]")):
        load_keys(_key_file(tmp_path, text, mode))


def test_a_missing_key_file_or_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="No such file"):
        load_keys(tmp_path / "absent")
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_keys(tmp_path)


def test_systemd_credentials_are_found(tmp_path: Path) -> None:
    assert credential_path({}) is None
    assert credential_path({"CREDENTIALS_DIRECTORY": str(tmp_path)}) is None
    (tmp_path / "bmslink-command-keys").write_text("")
    assert credential_path({"CREDENTIALS_DIRECTORY": str(tmp_path)}) == tmp_path / "bmslink-command-keys"
