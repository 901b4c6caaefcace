"""The page in a real headless browser: Debian's Chromium driven through ChromeDriver by Selenium,
against real controller services (real Mosquitto, python-can virtual bus).

Selenium's calls block (HTTP to ChromeDriver), and the controller runs on this test's event loop: every
browser call goes through ``asyncio.to_thread`` so that the controller keeps cycling meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from controller.failover import Role
from tests.agent.helpers import wait_until
from tests.web.site import RACK_CCL_A, RACK_DCL_A, WebSite

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
T = TypeVar("T")


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[webdriver.Chrome]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed (Debian packages chromium and "
                    "chromium-driver; scripts/setup installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # This machine's network is closed: without the background-networking flags Chromium keeps trying
    # its update, sync and field-trial servers.
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--window-size=1280,1400", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(argument)
    driver = await asyncio.to_thread(webdriver.Chrome, service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(10)
    try:
        yield driver
    finally:
        await asyncio.to_thread(driver.quit)


async def seen(driver: webdriver.Chrome, read: Callable[[webdriver.Chrome], T], ok: Callable[[T], bool],
               timeout_s: float, what: str) -> T:
    """Poll the page until ``ok(read(driver))``; return that value. Elements re-rendered between the
    find and the read are simply read again."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while True:
        try:
            value = await asyncio.to_thread(read, driver)
        except (NoSuchElementException, StaleElementReferenceException) as exc:
            last = exc
        else:
            if ok(value):
                return value
            last = value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last: {last!r}")
        await asyncio.sleep(0.1)


def text_of(css: str) -> Callable[[webdriver.Chrome], str]:
    return lambda driver: str(driver.find_element(By.CSS_SELECTOR, css).text)


def rack_states(driver: webdriver.Chrome) -> dict[str, str]:
    rows = driver.find_elements(By.CSS_SELECTOR, "#racks tbody tr")
    return {str(row.get_attribute("data-rack")): str(row.find_element(By.CSS_SELECTOR, "td.state").text)
            for row in rows}


async def test_the_page_shows_the_racks_the_bank_and_its_plots(
    site: WebSite, browser: webdriver.Chrome
) -> None:
    svc = await site.start(racks=3)
    site.publishing |= {"rack-01", "rack-02"}
    await wait_until(lambda: svc.state is not None and svc.state.eligible_racks == 2, 5.0, "racks admitted")
    await asyncio.to_thread(browser.get, site.url())

    states = await seen(browser, rack_states, lambda s: s.get("rack-02") == "ok", 5.0, "the racks")
    assert states == {"rack-01": "ok", "rack-02": "ok", "rack-03": "stale"}
    assert await seen(browser, text_of("#bank-ccl"), lambda t: t.startswith("200.0 A"), 5.0, "the bank's CCL")
    assert (await asyncio.to_thread(text_of("#bank-dcl"), browser)).startswith(f"{2 * RACK_DCL_A:.1f} A")
    reason = await asyncio.to_thread(text_of("#bank-ccl-reason"), browser)
    assert svc.state is not None and reason == svc.state.ccl_reason
    assert f"{RACK_CCL_A:.1f} A × 2 eligible" in reason
    assert await asyncio.to_thread(text_of("#bank-racks"), browser) == "2 of 3 racks eligible, 560 Ah"
    assert await asyncio.to_thread(text_of("#role"), browser) == "active"
    assert await asyncio.to_thread(text_of("#live"), browser) == "live"
    stale_reason = await asyncio.to_thread(text_of('#racks tr[data-rack="rack-03"] td.reason'), browser)
    assert "no valid telemetry" in stale_reason
    # The plots draw the history: a CCL line with a point a second (at least two by now).
    points = await seen(
        browser, lambda d: str(d.find_element(By.CSS_SELECTOR, '#plot-current polyline[data-series="ccl_a"]')
                               .get_attribute("points")),
        lambda p: len(p.split()) >= 2, 5.0, "the CCL line")
    assert all("," in point for point in points.split())
    for series in ("soc_pct", "temperature_max_c"):
        css = f'polyline[data-series="{series}"]'
        assert await asyncio.to_thread(browser.find_elements, By.CSS_SELECTOR, css)


async def test_a_rack_going_stale_is_shown_within_seconds(
    site: WebSite, browser: webdriver.Chrome, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bmslink.journal")  # rack_state events are journaled at INFO
    svc = await site.start(racks=2)
    site.publishing |= {"rack-01", "rack-02"}
    await wait_until(lambda: svc.state is not None and svc.state.eligible_racks == 2, 5.0, "racks admitted")
    await asyncio.to_thread(browser.get, site.url())
    await seen(browser, rack_states, lambda s: s == {"rack-01": "ok", "rack-02": "ok"}, 5.0, "both ok")

    site.publishing.discard("rack-02")  # its agent falls silent
    silent_s = time.monotonic()
    await seen(browser, rack_states, lambda s: s.get("rack-02") == "stale", 6.0, "rack-02 shown stale")
    shown_after_s = time.monotonic() - silent_s
    # stale_after is 3 × its 500 ms poll interval; the page updates every second.
    assert 1.0 <= shown_after_s <= 4.0, shown_after_s
    assert await asyncio.to_thread(text_of('#racks tr[data-rack="rack-01"] td.state'), browser) == "ok"
    await seen(browser, text_of("#bank-racks"), lambda t: t.startswith("1 of 2 racks eligible"), 3.0,
               "the bank down to one rack")
    await seen(browser, lambda d: [str(r.text) for r in d.find_elements(By.CSS_SELECTOR, "#events tbody tr")],
               lambda rows: any("rack-02" in r and "ok -> stale" in r for r in rows), 3.0, "the journal")


async def test_the_standbys_page_shows_it_taking_over(site: WebSite, browser: webdriver.Chrome) -> None:
    first = await site.start(1, racks=2, failover=True)
    await wait_until(lambda: first.role is Role.ACTIVE, 3.0, "n1 active")
    second = await site.start(2, racks=2, failover=True)
    site.publishing |= {"rack-01", "rack-02"}
    await wait_until(lambda: second.role is Role.STANDBY, 3.0, "n2 standby")
    await asyncio.to_thread(browser.get, site.url(2))

    await seen(browser, text_of("#role"), lambda t: t == "standby", 5.0, "the standby's role")
    peer = 'tr[data-node-number="1"] td.role-cell'
    await seen(browser, text_of(f"#controllers {peer}"), lambda t: t == "active", 5.0, "node 1 shown active")

    await site.stop(1)
    stopped_s = time.monotonic()
    await wait_until(lambda: second.role is Role.ACTIVE, 3.0, "the takeover")
    await seen(browser, text_of("#role"), lambda t: t == "active", 4.0, "the takeover on the page")
    assert time.monotonic() - stopped_s < 5.0
    rows = await asyncio.to_thread(lambda: [str(r.text) for r in browser.find_elements(
        By.CSS_SELECTOR, "#controllers tbody tr")])
    assert "n2 (this page)" in rows[0] and "active" in rows[0]
    assert not any(" active " in f" {row} " for row in rows[1:])  # nobody else claims the role
    # the page's bank is the new active's: both racks still in the bank
    await seen(browser, text_of("#bank-racks"), lambda t: t.startswith("2 of 2"), 3.0, "the bank")
