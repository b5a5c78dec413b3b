"""The status page (SPEC §12) in a real browser: Debian's chromium, driven by selenium
through chromium-driver (both installed by .ci/run), against `relay serve`.

An operator logs in with the token, sees a suspended provider and its reason, the last
deferrals (a reply carrying HTML shown as text), searches a message ID and reads its
recipients, last reply and timeline; without the cookie, or with a forged one, the page
asks for the login again. A screenshot is saved under the test's temporary directory.
"""

from __future__ import annotations

import http.client
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from relay.admin.service import NotFound
from relay.admin.status import COOKIE, StatusPage, cookie_for
from relay.config.loader import parse_config
from relay.queue.deferrals import RecentDeferrals
from relay.queue.models import QueuedMessage
from relay.spool.records import Envelope, EnvelopeRecipient
from tests.relayproc import RelayProcess, base_config, http_call, make_message
from tests.support import depth, route, wait_until

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# HTML in a remote reply: the page must show it as text, never as markup.
HOSTILE_REPLY = "451 4.7.0 <b id=injected>greylisted</b>, come back later"
PROVIDERS = {"p": {"domains": ["p.test"]}}


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    for path in (CHROMIUM, DRIVER):
        if shutil.which(path) is None:
            pytest.fail(
                f"{path} is missing: apt-get install chromium chromium-driver (.ci/run does)"
            )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where chromium's sandbox cannot start
        "--disable-dev-shm-usage",
        "--no-proxy-server",  # loopback only, whatever the environment says
        "--window-size=1000,1300",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(argument)
    # The driver named explicitly: selenium then never looks for (or downloads) one.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: WebDriver, css: str, timeout: float = 10) -> WebElement:
    """The element once the page that has it is loaded (bounded)."""
    found: WebElement = WebDriverWait(driver, timeout).until(
        lambda d: d.find_element(By.CSS_SELECTOR, css)
    )
    return found


def section(driver: WebDriver, title: str) -> str:
    """The text of the page from the heading that starts with `title` to the next one."""
    for heading in driver.find_elements(By.TAG_NAME, "h2"):
        if heading.text.startswith(title):
            texts = [heading.text]
            for sibling in heading.find_elements(By.XPATH, "following-sibling::*"):
                if sibling.tag_name == "h2":
                    break
                texts.append(sibling.text)
            return "\n".join(texts)
    raise AssertionError(f"no section {title!r} in:\n{driver.page_source[:3000]}")


def asks_for_login(driver: WebDriver) -> bool:
    return bool(driver.find_elements(By.CSS_SELECTOR, "form[action='/login'] input[name=token]"))


def log_in(driver: WebDriver, token: str) -> None:
    field = wait_for(driver, "input[name=token]")
    field.send_keys(token)
    field.submit()


def test_status_page_in_a_browser(relay_factory, dns_server, mx_farm, browser, tmp_path):
    started = time.monotonic()
    route(dns_server, "stuck.test", "127.0.0.61")
    route(dns_server, "grey.test", "127.0.0.62")
    mx_farm.server("127.0.0.61")
    grey = mx_farm.server("127.0.0.62")
    grey.rcpt_hook = lambda address: HOSTILE_REPLY
    relay: RelayProcess = relay_factory(
        providers={
            "stuck": {"domains": ["stuck.test"], "max_connections": 3, "rate": "100/min"},
            "grey": {"domains": ["grey.test"]},
        },
        # One attempt, then a long wait: the deferred recipient stays deferred while the
        # browser looks, instead of being active in its next attempt now and then.
        retry={"initial": "1h", "max": "1h", "lifetime": "1d"},
    )
    token = relay.admin_token()
    assert token  # generated into the spool at the first start
    assert relay.api("POST", "/api/providers/stuck/suspend", {"for": "1h"})[0] == 200
    waiting = relay.send("app@example.org", ["ann@stuck.test"], make_message("waits"))
    deferred = relay.send("app@example.org", ["bob@grey.test"], make_message("greylisted"))
    relay.wait_log(f"id={deferred} to=<bob@grey.test> provider=grey")
    assert wait_until(lambda: depth(relay, "stuck", "deferred") == 1)
    page = f"http://127.0.0.1:{relay.admin_port}/"

    # No cookie: the login form, and a wrong token gets it again with a reason.
    browser.get(page)
    assert asks_for_login(browser)
    log_in(browser, "not-the-token")
    assert "not the admin token" in wait_for(browser, "p.bad").text
    assert browser.get_cookie(COOKIE) is None

    log_in(browser, token)
    wait_for(browser, "form.search input[name=id]")
    cookie: dict[str, Any] | None = browser.get_cookie(COOKIE)
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert cookie["value"] != token  # it stands for the token on this page only

    # The suspended provider, its reason and time left; its queue as relay_queue_depth has it.
    pauses = section(browser, "Suspensions")
    assert "stuck suspended suspended by the administrator 59m" in pauses, pauses
    queues = section(browser, "Queues")
    assert "stuck transactional 0 0 1 0" in queues, queues
    limits = section(browser, "Limits")
    assert "stuck 0 3 / 3 100/min" in limits, limits
    assert "none" in section(browser, "Tripped accounts")

    # The deferral, its reply shown as text: no element was injected.
    recent = section(browser, "Last")
    assert deferred in recent and "bob@grey.test" in recent, recent
    assert HOSTILE_REPLY.replace("451 ", "") in recent, recent
    assert not browser.find_elements(By.ID, "injected")

    # On a phone's width nothing but the tables' own scrollers is wider than the screen.
    browser.set_window_size(390, 844)
    browser.refresh()
    wait_for(browser, "form.search")
    assert browser.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth"
    )
    browser.save_screenshot(str(tmp_path / "status-phone.png"))
    browser.set_window_size(1000, 1300)

    # Search: the message's recipients, states, last reply, and its timeline.
    # The API's answer first: the page, rendered after it, has at least those events.
    status, answer = relay.api("GET", f"/api/queue/{deferred}")
    assert status == 200
    search = wait_for(browser, "form.search input[name=id]")
    search.clear()
    search.send_keys(deferred)
    search.submit()
    heading = wait_for(browser, "h2")
    assert heading.text == f"Message {deferred}"
    details = section(browser, f"Message {deferred}")
    assert "bob@grey.test grey deferred" in details, details
    assert "greylisted" in details and "<app@example.org>" in details
    if "timeline" in answer:  # the queue records events: each is shown
        titles = [h.text for h in browser.find_elements(By.TAG_NAME, "h3")]
        assert "Timeline" in titles
        for event in answer["timeline"]:
            assert str(event["event"]) in details, (event, details)
    else:
        assert "Timeline" not in details
    shot = tmp_path / "status.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 10_000

    # An unknown ID says so; the text typed is shown, escaped, never run.
    browser.get(page + "?id=%3Cb%20id%3Dinjected%3Ex%3C%2Fb%3E")
    assert "Not in the queue" in wait_for(browser, "p.bad").text
    assert not browser.find_elements(By.ID, "injected")
    browser.get(page + f"?id={waiting}")
    assert "ann@stuck.test stuck deferred" in section(browser, f"Message {waiting}")

    # Log out: the cookie is gone and the page asks for the login again.
    browser.find_element(By.LINK_TEXT, "log out").click()
    wait_for(browser, "input[name=token]")
    assert browser.get_cookie(COOKIE) is None and asks_for_login(browser)

    # Without the cookie, or with the raw token where the cookie goes: the login form.
    browser.add_cookie({"name": COOKIE, "value": token, "path": "/"})
    browser.get(page)
    assert asks_for_login(browser)
    browser.delete_all_cookies()
    browser.get(page)
    assert asks_for_login(browser)
    print(f"status page test: {time.monotonic() - started:.1f}s")


def admin_call(
    relay: RelayProcess, method: str, path: str, headers: dict[str, str], body: bytes | None = None
) -> tuple[int, Any]:
    sent: dict[str, str | bytes] = {"Host": f"127.0.0.1:{relay.admin_port}", **headers}
    return http_call(relay.admin_port, method, path, sent, body)


def test_the_cookie_opens_the_page_only_and_the_login_form_is_guarded(relay_factory):
    relay: RelayProcess = relay_factory(admin={"token": "page-token"})
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    # The login form's POST passes the Host and Origin checks like any request.
    foreign = {**form, "Origin": "http://evil.test"}
    assert admin_call(relay, "POST", "/login", foreign, b"token=page-token")[0] == 403
    rebound = {**form, "Host": f"evil.test:{relay.admin_port}"}
    assert admin_call(relay, "POST", "/login", rebound, b"token=page-token")[0] == 403
    # Only a form: a JSON login is refused, and so is every other form-encoded POST.
    status, _ = admin_call(
        relay, "POST", "/login", {"Content-Type": "application/json"}, b'{"token": "page-token"}'
    )
    assert status == 415
    bearer = {"Authorization": "Bearer page-token", **form}
    assert admin_call(relay, "POST", "/api/queue/flush", bearer, b"provider=x")[0] == 415
    # A right token: 303 to the page, with the cookie that stands for the token there.
    connection = http.client.HTTPConnection("127.0.0.1", relay.admin_port, timeout=10)
    try:
        connection.request(
            "POST",
            "/login",
            body=b"token=page-token",
            headers={**form, "Origin": f"http://127.0.0.1:{relay.admin_port}"},
        )
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    assert response.status == 303 and response.getheader("Location") == "/"
    set_cookie = response.getheader("Set-Cookie") or ""
    assert set_cookie.startswith(f"{COOKIE}={cookie_for('page-token')};"), set_cookie
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/"):
        assert attribute in set_cookie, set_cookie
    assert "page-token" not in set_cookie
    cookie = {"Cookie": f"{COOKIE}={cookie_for('page-token')}"}
    status, page = admin_call(relay, "GET", "/", cookie)
    assert status == 200 and "Queues" in page
    # The cookie opens nothing but the page; a bearer token still opens the page too.
    assert admin_call(relay, "GET", "/api/queue", cookie)[0] == 401
    assert admin_call(relay, "GET", "/api/providers", cookie)[0] == 401
    with_token = {"Authorization": "Bearer page-token"}
    status, page = admin_call(relay, "GET", "/", with_token)
    assert status == 200 and "Limits in force" in page
    # Without either: the login form, 401.
    status, page = admin_call(relay, "GET", "/", {})
    assert status == 401 and "name=token" in page and "Queues" not in page


# The page alone, with stand-in sources: what the daemon cannot be made to show yet.


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


class Gauges(Collector):
    """relay_queue_depth as the daemon's collector yields it, and the account guard's
    gauge as the guard will."""

    def collect(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily("relay_queue_depth", "", labels=["provider", "class", "state"])
        depth.add_metric(["p", "bulk", "deferred"], 1234)
        depth.add_metric(["p", "bulk", "ready"], 0)
        yield depth
        tripped = GaugeMetricFamily("relay_account_guard_tripped", "", labels=["account"])
        tripped.add_metric(["<i>hacked</i>"], 1)
        tripped.add_metric(["quiet"], 0)
        yield tripped


def test_the_page_escapes_what_comes_from_outside_and_shows_a_timeline(tmp_path, password_hash):
    config = parse_config(base_config(tmp_path, 53, 25, password_hash, providers=PROVIDERS))
    clock = FakeClock(1_700_000_000.0)
    registry = CollectorRegistry()
    registry.register(Gauges())
    deferrals = RecentDeferrals(clock, size=3)
    hostile = EnvelopeRecipient("<script>x</script>@p.test")
    message = QueuedMessage(
        Envelope("M1", "a@example.org", (hostile,), clock.now, 10, "bulk", "app"), 0
    )
    for n in range(5):  # bounded: only the last 3 are kept, newest first
        message.recipients[0].last_reply = f"451 4.3.0 try {n} <img src=x>"
        deferrals.record(message, message.recipients, "p")
    timeline = [
        {"time": clock.now - 60, "event": "received", "size": 10, "client": "<b>1.2.3.4</b>"},
        {
            "time": clock.now - 30,
            "event": "attempt",
            "recipients": ["x@p.test", "y@p.test"],
            "reply": "451 <u>later</u>",
            "mx": None,
            "next_attempt": clock.now + 60,
        },
    ]

    def show(message_id: str) -> dict[str, Any]:
        if message_id != "M1":
            raise NotFound(message_id)
        recipient = {"address": hostile.address, "state": "deferred", "attempts": 5}
        answer = {"id": "M1", "sender": "a@example.org", "size": 10, "arrival": clock.now}
        return {**answer, "recipients": [recipient], "timeline": timeline}

    page = StatusPage(
        config=lambda: config,
        lanes=lambda: [],
        registry=registry,
        deferrals=deferrals,
        show=show,
        clock=clock,
    )
    text = page.render("M1")
    for raw in ("<script>", "<img", "<b>1.2.3.4", "<u>", "<i>hacked"):
        assert raw not in text, raw
    assert "&lt;script&gt;x&lt;/script&gt;@p.test" in text
    assert "Last 3 deferrals" in text
    assert text.index("try 4") < text.index("try 3") < text.index("try 2")
    assert "try 1" not in text
    assert "<h3>Timeline</h3>" in text
    assert "2023-11-14 22:12:20Z</td><td>received</td>" in text
    assert "client=&lt;b&gt;1.2.3.4&lt;/b&gt;" in text and "mx=" not in text
    assert "recipients=x@p.test, y@p.test" in text
    assert "next_attempt=2023-11-14 22:14:20Z" in text
    assert "1,234" in text  # the depth collector's figure, as /metrics has it
    assert "<li class=bad>&lt;i&gt;hacked&lt;/i&gt;</li>" in text and "quiet" not in text
    assert "Not in the queue" in page.render("M2")
    # A message ID typed into the search box comes back escaped, in the box and heading.
    typed = page.render('"><script>alert(1)</script>')
    assert "<script>" not in typed and 'value="&quot;&gt;&lt;script&gt;' in typed
