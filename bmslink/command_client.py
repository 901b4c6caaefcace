"""``bmslink cmd``: sign an operator command, send it to the active controller, wait for its reply.

The same signed bytes are sent again every ``RESEND_S`` until a reply comes or the timeout ends: a
controller that already answered them answers the same again, and after a takeover the new active
answers, so neither a lost message nor a failover loses the command.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from shared.codec import DecodeError, Decoder
from shared.commands import CommandReply, OperatorCommand, encode_request
from shared.config import MqttConfig
from shared.mqtt import MqttSession
from shared.topics import Topics

RESEND_S = 1.0


class CommandClientError(Exception):
    """The command could not be delivered or answered; the message says why, for the operator."""


@dataclass(frozen=True)
class Answer:
    reply: CommandReply
    round_trip_s: float  # from the first send to the reply


async def send_command(mqtt: MqttConfig, site_id: str, command: OperatorCommand, key: bytes, *,
                       timeout_s: float, connect_timeout_s: float = 5.0) -> Answer:
    """Send ``command`` signed with ``key``; the reply, or CommandClientError (no broker, no answer)."""
    topics = Topics(mqtt.topic_prefix, site_id)
    session = MqttSession(mqtt, mqtt.client_id or f"bmslink-cmd-{command.id[:12]}", receive_queue_size=100)
    session.subscribe(topics.command_reply(command.id), qos=1)
    await session.start()
    try:
        if not await session.wait_connected(connect_timeout_s):
            why = session.stats.last_disconnect_reason or "no answer"
            raise CommandClientError(f"cannot connect to the broker at {mqtt.host}:{mqtt.port} ({why}; "
                                     f"{session.stats.connect_failures} failed attempt(s))")
        payload = encode_request(command, key)
        decoder: Decoder[CommandReply] = Decoder(CommandReply)
        started = time.monotonic()
        deadline = started + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            session.publish(topics.command_request, payload, qos=1)
            try:
                async with asyncio.timeout(min(RESEND_S, remaining)):
                    message = await session.messages.get()
            except TimeoutError:
                continue
            try:
                reply = decoder.decode(message.payload, message.topic)
            except DecodeError as exc:
                raise CommandClientError(f"unreadable reply on {message.topic}: {exc}") from None
            if reply.retry and time.monotonic() + RESEND_S < deadline:
                await asyncio.sleep(RESEND_S)  # "not now": the same bytes again, while time is left
                continue
            return Answer(reply, time.monotonic() - started)
        raise CommandClientError(f"no reply within {timeout_s:g} s: is an active controller running for site "
                                 f"{site_id!r} under prefix {mqtt.topic_prefix!r}, and may this user publish "
                                 f"to {topics.command_request}?")
    finally:
        await session.stop()


def describe(answer: Answer) -> str:
    """The reply as lines for a terminal."""
    reply = answer.reply
    verdict = "accepted" if reply.accepted else "REFUSED"
    lines = [f"{verdict} by {reply.node_id} in {answer.round_trip_s * 1000:.0f} ms: {reply.reason}"]
    lines += [f"  released  {note.rack_id} {note.flag}" for note in reply.released]
    lines += [f"  held      {note.rack_id} {note.flag}: {note.why}" for note in reply.held]
    return "\n".join(lines)


def as_json(answer: Answer) -> str:
    return json.dumps({**answer.reply.model_dump(mode="json"), "round_trip_s": answer.round_trip_s})
