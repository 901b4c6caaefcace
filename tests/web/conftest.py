"""Fixtures of the web page's tests: a :class:`~tests.web.site.WebSite` on the session broker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fixtures.broker import MosquittoBroker
from tests.web.site import WebSite


@pytest.fixture
async def site(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str, tmp_path: Path
) -> AsyncIterator[WebSite]:
    s = WebSite(mqtt_broker, unique_topic_prefix, tmp_path)
    await s.open()
    try:
        yield s
    finally:
        await s.close()
