"""
The serial console page in a real browser: headless Chromium (driven by Playwright,
the system's /usr/bin/chromium) presents a client certificate to the real daemon,
loads C{/console?<IP>}, types a command into xterm.js and the test reads the
guest's output back from the terminal's DOM; a stranger's certificate gets a 403
page and no console. A screenshot is saved in C{_trial_temp/screenshots/}.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from tests import support
from tests.test_console_real import ShellGuestCase
from tests.test_pages_browser import CHROMIUM_FLAGS, chromium


@contextlib.contextmanager
def chromium_with(testcase: Any) -> Iterator[tuple[Any, Any]]:
    """
    The system's Chromium driven by Playwright, and Playwright's C{expect} (waits
    through locators: the pages' CSP forbids the eval of C{wait_for_function}).
    """
    executable = chromium()
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        support.require(False, "playwright is not installed (pip install playwright)")
        raise
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            yield browser, expect
        finally:
            browser.close()


def context(testcase: Any, browser: Any, origin: str, user: str, height: int = 800) -> Any:
    """
    A browser context presenting C{user}'s client certificate to C{origin}.
    """
    pair = testcase.pair(user)
    return browser.new_context(
        ignore_https_errors=True,
        client_certificates=[
            {"origin": origin, "certPath": pair.cert_path, "keyPath": pair.key_path}
        ],
        viewport={"width": 1100, "height": height},
    )


def goto(page: Any, url: str) -> Any:
    """
    C{page.goto(url)}, again when Chromium gives up with C{ERR_NETWORK_CHANGED}: it
    does when an interface appears or goes anywhere on the host (other tests make and
    remove bridges and namespaces while this one runs), not only on the way to C{url}.
    """
    for attempt in range(4):
        try:
            return page.goto(url)
        except Exception as e:  # playwright's Error
            if "ERR_NETWORK_CHANGED" not in str(e) or attempt == 3:
                raise
    raise AssertionError("unreachable")


def screenshot(page: Any, name: str) -> None:
    """
    Save the page in C{_trial_temp/screenshots/} for people to look at.
    """
    directory = os.path.abspath("screenshots")
    os.makedirs(directory, exist_ok=True)
    page.screenshot(path=os.path.join(directory, name))


class BrowserConsoleTests(ShellGuestCase):
    """
    /console?<IP> in Chromium against the real daemon and guest.
    """

    def test_type_and_read_back(self) -> None:
        """
        The owner's browser: connected, a command typed, its output in the DOM.
        """
        origin = f"https://127.0.0.1:{self.d.port}"
        url = f"{origin}/console?{self.ip}"
        with chromium_with(self) as (browser, expect):
            owner = context(self, browser, origin, "owner", height=700)
            page = owner.new_page()
            response = goto(page, url)
            assert response is not None
            self.assertEqual(response.status, 200)
            # (expect, not wait_for_function: the page's CSP forbids eval)
            expect(page.locator("#console-status")).to_have_text("connected", timeout=30000)
            page.locator(".xterm-helper-textarea").focus()
            page.keyboard.type("echo brow$((6*7))ser")
            page.keyboard.press("Enter")
            expect(page.locator(".xterm-rows")).to_contain_text("brow42ser", timeout=30000)
            rows = page.locator(".xterm-rows").text_content() or ""
            self.assertIn("echo brow$((6*7))ser", rows)  # the guest's echo of the input
            screenshot(page, "console.png")
            # The console is taken: a second page is refused, and says so.
            second = owner.new_page()
            goto(second, url)
            expect(second.locator("#console-status")).to_have_text(
                "refused: VM already has a serial port connection", timeout=30000
            )
            # The VM's status page links to its console.
            show = owner.new_page()
            goto(show, f"{origin}/showVM?{self.ip}")
            show.locator(f'a[href="/console?{self.ip}"]').click()
            expect(show.locator("h1")).to_have_text(f"Serial console of VM {self.ip}")
            stranger = context(self, browser, origin, "other")
            denied = goto(stranger.new_page(), url)
            assert denied is not None
            self.assertEqual(denied.status, 403)
            self.assertIn("no access to VM", denied.text())


class BrowserVncTests(ShellGuestCase):
    """
    /console?<IP> of a VM with ConsoleType vnc: noVNC connects to the guest's screen.
    """

    create_flags = ("-consoleType", "vnc")

    def test_novnc_connects(self) -> None:
        """
        noVNC (vendored) over ConnectToVmConsole's WebSocket: connected, a canvas of the
        guest's screen, while the serial console works on the same page.
        """
        origin = f"https://127.0.0.1:{self.d.port}"
        with chromium_with(self) as (browser, expect):
            page = context(self, browser, origin, "owner", height=1100).new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            goto(page, f"{origin}/console?{self.ip}")
            expect(page.locator("#vnc-status")).to_have_text("connected", timeout=30000)
            expect(page.locator("#screen canvas")).to_have_count(1)
            expect(page.locator("#console-status")).to_have_text("connected")
            screenshot(page, "console-vnc.png")
            self.assertEqual(errors, [])
