"""Open a report the way its reader does: in headless Chromium (Debian's package, installed by
`make test`), driven by Playwright's Python API with the system browser. A page must load with
no console error and no failed request; a PNG screenshot of it lands under build/screenshots/."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "build" / "screenshots"
# as the machine's notes say: without the background-networking flags Chromium keeps trying
# (and failing) to reach Google's hosts from a closed network
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError("chromium is not installed: `make test` installs Debian's chromium package")
    return path


@dataclass
class Opened:
    page: object
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    screenshot: Path | None = None

    def text(self) -> str:
        return self.page.inner_text("body")

    def count(self, selector: str) -> int:
        return self.page.locator(selector).count()


class Browser:
    def __init__(self):
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        self._browser = self._pw.chromium.launch(executable_path=chromium_path(), args=FLAGS)
        self._context = self._browser.new_context(viewport={"width": 1280, "height": 900})
        # nothing may be fetched from outside: a page that tries fails the test
        self._context.route("http*://**", lambda route: route.abort()
                            if not route.request.url.startswith(("http://127.0.0.1", "http://localhost")) else route.continue_())

    def open(self, path: Path, shot: str) -> Opened:
        page = self._context.new_page()
        out = Opened(page)
        page.on("console", lambda m: out.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: out.console_errors.append(str(e)))
        page.on("requestfailed", lambda r: out.failed_requests.append(r.url))
        page.goto(Path(path).resolve().as_uri(), wait_until="load")
        page.wait_for_timeout(500)  # let scripted charts draw
        SHOTS.mkdir(parents=True, exist_ok=True)
        out.screenshot = SHOTS / f"{shot}.png"
        page.screenshot(path=str(out.screenshot), full_page=True)
        return out

    def close(self) -> None:
        self._context.close()
        self._browser.close()
        self._pw.stop()
