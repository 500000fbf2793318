"""`make demo` in a real browser: headless Chromium (Debian's chromium and
chromium-driver, which the Makefile installs) driven by Selenium through the shop behind
the gateway, as a first-time visitor would click through it. Two browser profiles stand
for two devices. A screenshot of each step is saved under the test's temporary folder
(``screenshots/``); two of them are in docs/ and the README.

Chromium runs offline: no sandbox (root in a container), no GPU, no background
networking, component updates, sync or first-run page, its own fresh profile, and every
host name but the demo's own resolving to nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

try:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - the dev extras install it
    webdriver = None

missing = [
    what
    for what, there in (
        ("selenium", webdriver is not None),
        ("chromium", os.path.exists(CHROMIUM)),
        ("chromium-driver", os.path.exists(CHROMEDRIVER)),
    )
    if not there
]
if missing and os.environ.get("CI"):
    # In CI (make test) the Makefile installs them: missing there is a failure.
    pytest.fail(f"the browser test needs {', '.join(missing)} (make system-deps)", pytrace=False)
pytestmark = pytest.mark.skipif(
    bool(missing), reason=f"needs {', '.join(missing)}: make system-deps installs them"
)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[str]:
    """``make demo`` (walk included) on a free port; the address it prints."""
    port = free_port()
    out = (tmp_path / "demo.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.fake_web_retailer.demo", "--port", str(port),
         "--data-dir", str(tmp_path / "demo")],
        cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    log = tmp_path / "demo.log"
    deadline = time.monotonic() + 120
    while "The demo is ready" not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    assert "All steps passed." in log.read_text()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        out.close()


Browser = Callable[[str], "WebDriver"]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    drivers: list[WebDriver] = []

    def start(name: str) -> WebDriver:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
            f"--user-data-dir={tmp_path / f'profile-{name}'}",
            "--window-size=1100,900",
            # Nothing but the demo on loopback: any other host name resolves to nothing.
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        ):
            options.add_argument(arg)
        driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
        driver.set_page_load_timeout(20)
        drivers.append(driver)
        return driver

    yield start
    for d in drivers:
        d.quit()


class Shots:
    """A screenshot per step: the whole page, named by step."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.n = 0

    def __call__(self, driver: WebDriver, name: str) -> Path:
        self.n += 1
        height = int(driver.execute_script("return document.documentElement.scrollHeight"))
        driver.set_window_size(1100, max(600, min(height + 200, 2400)))
        path = self.folder / f"{self.n:02d}-{name}.png"
        driver.save_screenshot(str(path))
        driver.set_window_size(1100, 900)
        return path


def text(driver: WebDriver, css: str = "body") -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def wait(driver: WebDriver, condition: Any, timeout: float = 10) -> Any:
    return WebDriverWait(driver, timeout).until(condition)


def arrive(driver: WebDriver, click: Any, then_path: str) -> None:
    """Click, and wait until the browser shows the new page at ``then_path``."""
    # A mark on the old page: gone once the browser shows the new one. (Watching the old
    # page's nodes go stale can fail mid-navigation with "Node ... does not belong to
    # the document".)
    driver.execute_script("window.__before_click = true")
    click.click()

    def arrived(d: WebDriver) -> bool:
        return bool(
            d.execute_script(
                "return window.__before_click === undefined"
                " && document.readyState === 'complete'"
            )
            and d.current_url.split("?")[0].endswith(then_path)
        )

    WebDriverWait(driver, 10, ignored_exceptions=(WebDriverException,)).until(arrived)


def submit(driver: WebDriver, form_action: str, then_path: str, within: str = "") -> None:
    """Click the button of the form posting to ``form_action`` (the first one, or the
    one holding ``within``); wait for ``then_path``."""
    css = f'form[action="{form_action}"] {within} button'.replace("  ", " ")
    arrive(driver, driver.find_element(By.CSS_SELECTOR, css), then_path)


def log_in(driver: WebDriver, base: str, user: str, password: str, next_path: str) -> None:
    driver.get(f"{base}/login?next={next_path}")
    driver.find_element(By.NAME, "username").send_keys(user)
    driver.find_element(By.NAME, "password").send_keys(password)
    submit(driver, "/login", next_path)


def field(driver: WebDriver, name: str) -> str:
    return text(driver, f"#field-{name} td")


def test_a_first_visit_in_a_real_browser(demo: str, browser: Browser, tmp_path: Path) -> None:
    started = time.monotonic()
    shot = Shots(tmp_path / "screenshots")
    laptop = browser("laptop")

    # A visitor looks around: no session yet, the inspector says so.
    laptop.get(demo + "/")
    assert text(laptop, "#who") == "Log in"
    shot(laptop, "home")
    arrive(laptop, laptop.find_element(By.ID, "inspector-link"), "/inspector")
    assert "No session yet" in text(laptop, "#no-session")
    assert text(laptop, "#session-writes") == "0 session writes"

    # A guest cart: the first thing stored makes a session.
    laptop.get(demo + "/products/laptop-123")
    submit(laptop, "/cart/add", "/cart")
    assert "Added 1 × UltraBook 14 to your cart." in text(laptop, "#flash")  # noqa: RUF001
    assert "UltraBook 14" in text(laptop, "main table")
    shot(laptop, "guest-cart")

    # The inspector: what the gateway sent, what the shop answered, what Redis keeps.
    arrive(laptop, laptop.find_element(By.ID, "inspector-link"), "/inspector")
    received = text(laptop, "#received")
    assert "X-Session-Id" in received and "X-Session-Cart-Items 1" in received
    assert "X-Session-Cart-Add sku=laptop-123; qty=1; price=999.99" in text(
        laptop, "#instructions-sent"
    )
    keys = text(laptop, "#redis-keys")
    assert re.search(r"session:[0-9a-f]{64} hash (59|60) min", keys), keys
    assert re.search(r"cart:[0-9a-f]{64} hash (23 h 59 min|24 h)", keys), keys
    assert text(laptop, "#session-writes") == "0 session writes"
    shot(laptop, "inspector-guest")

    # The same product page again, until the gateway's page cache serves it (it caches
    # the ten most viewed products; the ranking is re-read every half second). The
    # browser revalidates every time, so every view reaches the gateway.
    for _ in range(12):
        laptop.get(demo + "/products/laptop-123")
        laptop.get(demo + "/inspector")
        if text(laptop, "#page-cache").startswith("HIT"):
            break
        time.sleep(0.3)
    assert text(laptop, "#page-cache").startswith("HIT: your last product page"), text(
        laptop, "#page-cache"
    )
    shot(laptop, "inspector-page-cache-hit")

    # On another device, alice fills her cart.
    phone = browser("phone")
    log_in(phone, demo, "alice", "alice-password", "/products/mouse-456")
    assert text(phone, "#who") == "alice"  # the logged-in header on a product page
    submit(phone, "/cart/add", "/cart")
    assert "Silent Mouse" in text(phone, "main table")
    shot(phone, "phone-alice-cart")

    # The guest logs in as alice: the carts are merged, and the page says so.
    log_in(laptop, demo, "alice", "alice-password", "/cart")
    assert text(laptop, "#flash") == "Welcome, alice. You are logged in."
    assert text(laptop, "#merge-notice") == (
        "1 item from your earlier visit was added to your cart."
    )
    cart = text(laptop, "main table")
    assert "UltraBook 14" in cart and "Silent Mouse" in cart
    assert "2 item(s)" in text(laptop, "#cart-summary")
    shot(laptop, "merged-cart")

    # The account page: the fields move with each page (the state before the request).
    laptop.get(demo + "/account")
    views = int(field(laptop, "page_views"))
    laptop.get(demo + "/products/keyboard-457")
    assert text(laptop, "#who") == "alice"
    laptop.get(demo + "/account")
    assert field(laptop, "current_page") == "/products/keyboard-457"
    assert int(field(laptop, "page_views")) == views + 2
    assert re.fullmatch(r"\d+ s ago \(\d\d:\d\d:\d\d UTC\)", field(laptop, "last_activity"))
    shot(laptop, "account")

    # One cart for both devices: the phone adds, the laptop sees it.
    phone.get(demo + "/products/keyboard-457")
    submit(phone, "/cart/add", "/cart")
    laptop.get(demo + "/cart")
    assert "3 item(s)" in text(laptop, "#cart-summary")
    assert "Clicky Keyboard" in text(laptop, "main table")
    laptop.get(demo + "/inspector")
    keys = text(laptop, "#redis-keys")
    assert "user_cart:1001 hash 30 days" in keys and "user_sessions:1001 set" in keys, keys
    assert text(laptop, "#session-writes") == "0 session writes"
    shot(laptop, "inspector-alice")

    # Pages for people, even where there is no page.
    laptop.get(demo + "/no-such-page")
    assert text(laptop, "#error-status") == "404 · Not Found"
    assert text(laptop, "#who") == "alice"
    shot(laptop, "not-found")

    # Log out everywhere: the phone is logged out too, and is told where to go.
    laptop.get(demo + "/account")
    submit(laptop, "/logout", "/", within='input[name="scope"][value="all"] ~')
    assert text(laptop, "#flash") == "You are logged out on every device."
    assert text(laptop, "#who") == "Log in"
    shot(laptop, "logged-out-everywhere")
    phone.get(demo + "/account")
    wait(phone, ec.url_contains("/login"))
    assert text(phone, "#flash") == "Log in to see your account."
    assert text(phone, "#who") == "Log in"
    shot(phone, "phone-logged-out")

    assert len(list((tmp_path / "screenshots").glob("*.png"))) == shot.n == 11
    assert time.monotonic() - started < 90
