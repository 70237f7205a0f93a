"""The web console in a real headless Chromium (the system's ``/usr/bin/chromium``, driven by
Playwright): log in, watch a key cool after an upstream 429 and come back, disable and enable
a key, search the request log, stream an answer in the playground, and every page without a
script error on a laptop and a phone screen.

``ROUTER_CONSOLE_SCREENSHOTS=docs/console`` keeps the screenshots of the last test (README's).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from router.app import create_app
from tests.router.console_fixtures import ADMIN_KEY, CLIENT_KEY, OTHER_CLIENT_KEY, console_config
from tests.router.helpers import PNG_BYTES, Answer, FakeUpstream, openai_chunk, openai_text

# .ci/run installs Debian's chromium; Playwright's own browser download is not used.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Expectations poll up to this long (the key's cool-down is 2 s).
WAIT_MS = 8000


@dataclass
class Console:
    url: str
    fake: FakeUpstream
    page: Page
    errors: list[str]

    async def chat(self, model: str, key: str = CLIENT_KEY) -> int:
        """One client request through the router; returns its status."""
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{self.url}/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {key}"},
            ) as resp:
                await resp.read()
                return resp.status

    async def login(self) -> None:
        await self.page.goto(f"{self.url}/ui")
        await self.page.get_by_label("Admin key").fill(ADMIN_KEY)
        await self.page.get_by_role("button", name="Log in").click()
        await expect(self.page.get_by_role("navigation")).to_be_visible()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert os.path.exists(CHROMIUM), "Chromium is required: apt-get install chromium"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        await browser.close()


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "log.db"


@pytest.fixture
async def console(aiohttp_server, fake, browser, log_path) -> AsyncIterator[Console]:
    server = await aiohttp_server(create_app(console_config(fake.base_url, log_path)))
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    yield Console(str(server.make_url("")).rstrip("/"), fake, page, errors)
    await context.close()
    assert not errors, f"script errors in the console: {errors}"


async def test_login_refuses_a_wrong_key_then_shows_the_overview(console: Console) -> None:
    page = console.page
    await page.goto(f"{console.url}/ui")
    await page.get_by_label("Admin key").fill("not-the-key")
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("alert").filter(has_text="wrong admin key")).to_be_visible()
    await expect(page.get_by_role("navigation")).to_be_hidden()
    await console.login()
    assert await console.chat("gpt") == 200
    await expect(page.locator("#t-errors")).to_have_text("0 of 1", timeout=WAIT_MS)
    await expect(page.locator("#t-keys")).to_have_text("4 / 4")
    await expect(page.locator("#chart-requests svg polyline").first).to_be_attached()


@pytest.mark.parametrize("log_path", [Path("/nonexistent-volume/log.db")])
async def test_the_overview_says_when_the_log_store_is_unavailable(console: Console) -> None:
    assert await console.chat("gpt") == 200
    await console.login()
    banner = console.page.get_by_role("alert").filter(has_text="request log store")
    await expect(banner).to_have_text(
        "the request log store is unavailable (unable to open database file); 1 request is "
        "buffered and will be written when it is back"
    )
    # The key states do not depend on the log.
    await expect(console.page.locator("#t-keys")).to_have_text("4 / 4")


async def test_key_cools_after_an_upstream_429_and_comes_back(console: Console) -> None:
    console.fake.queue(
        "openai",
        Answer(
            status=429,
            body={"error": {"message": "slow down", "type": "rate_limit", "code": None}},
            headers={"Retry-After": "2"},
        ),
    )
    await console.login()
    await console.page.get_by_role("link", name="Providers & keys").click()
    # The only key of oai cools: the request gets the 429, the next one waits for the key.
    assert await console.chat("gpt") == 429
    row = console.page.locator('tr[data-id="oai/0"]')
    await expect(row.locator(".state")).to_have_text("cooling", timeout=WAIT_MS)
    # The countdown of the Retry-After, and why.
    await expect(row.locator("td").nth(4)).to_have_text(re.compile(r"^[0-2] s$"))
    await expect(row.locator("td").nth(3)).not_to_have_text("–")
    await expect(row.locator(".state")).to_have_text("active", timeout=WAIT_MS)
    assert await console.chat("gpt") == 200


async def test_disable_and_enable_a_key_with_a_reason(console: Console) -> None:
    page = console.page
    await console.login()
    await page.get_by_role("link", name="Providers & keys").click()
    await page.get_by_label("Reason to disable claude/1").fill("leaked in a ticket")
    await page.get_by_role("button", name="Disable claude/1").click()
    row = page.locator('tr[data-id="claude/1"]')
    await expect(row.locator(".state")).to_have_text("disabled")
    await expect(row.locator("td").nth(3)).to_have_text("leaked in a ticket")
    # Traffic now goes to the other key only.
    for _ in range(3):
        assert await console.chat("claude") == 200
    await expect(page.locator('tr[data-id="claude/0"] td').nth(6)).to_have_text("3")
    await page.get_by_role("button", name="Enable claude/1").click()
    await expect(row.locator(".state")).to_have_text("active")


async def test_search_and_filter_the_request_log(console: Console) -> None:
    page = console.page
    assert await console.chat("gpt") == 200
    assert await console.chat("claude", OTHER_CLIENT_KEY) == 200
    assert await console.chat("gpt", OTHER_CLIENT_KEY) == 403  # outside team-b's models
    await console.login()
    await page.get_by_role("link", name="Request log").click()
    log = page.get_by_role("region", name="Request log")
    await expect(page.locator("#log-count")).to_have_text("Requests 1–3 of 3", timeout=WAIT_MS)
    await log.get_by_label("Client").fill("team-b")
    await log.get_by_label("Status").select_option("errors")
    await log.get_by_role("button", name="Search").click()
    await expect(page.locator("#log-count")).to_have_text("Requests 1–1 of 1")
    first = page.locator("#log-table tbody tr").first
    await expect(first).to_contain_text("this key may not use model 'gpt'")
    await log.get_by_label("Client").fill("")
    await log.get_by_label("Status").select_option("")
    await log.get_by_label("Search", exact=True).fill("claude")
    await page.keyboard.press("Enter")
    await expect(page.locator("#log-count")).to_have_text("Requests 1–1 of 1")
    await expect(first).to_contain_text("team-b")
    await first.focus()
    await page.keyboard.press("Enter")
    await expect(page.locator("#log-detail-body")).to_contain_text('"provider": "claude"')


async def test_playground_streams_an_answer_with_an_image(console: Console, tmp_path) -> None:
    pieces = ["The image ", "is one ", "pixel."]
    events = [(None, openai_chunk({"role": "assistant", "content": ""}))]
    events += [(None, openai_chunk({"content": p})) for p in pieces]
    events += [(None, openai_chunk({}, "stop")), (None, "[DONE]")]
    console.fake.queue("openai", Answer(events=events))
    image = tmp_path / "pixel.png"
    image.write_bytes(PNG_BYTES)
    page = console.page
    await console.login()
    await page.get_by_role("link", name="Playground").click()
    playground = page.get_by_role("region", name="Playground")
    await playground.get_by_label("Model").select_option("gpt")
    await playground.get_by_label("Message").fill("What is in this image?")
    await playground.get_by_label("Image (optional)").set_input_files(str(image))
    await playground.get_by_role("button", name="Send").click()
    await expect(page.locator("#chat-answer")).to_have_text("".join(pieces), timeout=WAIT_MS)
    await expect(page.locator('dd[data-field="Provider"]')).to_have_text("oai", timeout=WAIT_MS)
    await expect(page.locator('dd[data-field="Time to first token"]')).to_have_text(
        re.compile(r"\d")
    )
    sent = console.fake.seen[-1].body
    assert sent["stream"] is True
    parts = sent["messages"][0]["content"]
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")


async def test_every_page_renders_on_a_laptop_and_a_phone(
    console: Console, browser: Browser, tmp_path: Path
) -> None:
    """Each page after some traffic, without script errors, with screenshots (README's)."""
    keep = os.environ.get("ROUTER_CONSOLE_SCREENSHOTS")
    out = Path(keep or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    # README's screenshots get traffic spread over seconds, with varied upstream latency.
    rounds, pause = (20, 0.3) if keep else (4, 0.0)
    console.fake.queue(
        "anthropic",
        Answer(
            status=429,
            body={"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}},
            headers={"retry-after": "30"},
        ),
    )
    for i in range(rounds):
        console.fake.queue("openai", Answer(body=openai_text("hello"), delay_s=0.02 * (i % 7)))
        for model, key in [
            ("gpt", CLIENT_KEY),
            ("claude", OTHER_CLIENT_KEY),
            ("gemini", CLIENT_KEY),
        ]:
            await console.chat(model, key)
        await asyncio.sleep(pause)
    # A routing decision: oai fails with a 5xx, the fallback list moves on to claude.
    console.fake.queue("openai", Answer(status=503, body={"error": {"message": "overloaded"}}))
    assert await console.chat("fallback") == 200
    await console.chat("nope", CLIENT_KEY)
    page = console.page
    await console.login()
    pages = {
        "overview": "#t-rps",
        "providers": 'tr[data-id="claude/0"]',
        "models": "#decisions-table td:text('oai → claude')",
        "clients": "#clients-table td:text('/ 1,000,000 today')",
        "requests": "#log-table tbody tr",
        "playground": "#chat-model option",
        "config": "#config-body",
    }
    for name, ready in pages.items():
        await page.goto(f"{console.url}/ui#{name}")
        if name == "overview":
            await page.get_by_label("Window", exact=True).select_option("60")
        if name == "playground":
            playground = page.get_by_role("region", name="Playground")
            await playground.get_by_label("Message").fill("Say hello in five words.")
            await playground.get_by_role("button", name="Send").click()
            provider = page.locator('dd[data-field="Provider"]')
            await expect(provider).to_have_text("oai", timeout=WAIT_MS)
        await expect(page.locator(ready).first).to_be_attached(timeout=WAIT_MS)
        await page.wait_for_timeout(300)
        await page.screenshot(path=out / f"console-{name}.png", full_page=True)
    config = await page.locator("#config-body").inner_text()
    for secret in (ADMIN_KEY, CLIENT_KEY, "sk-one-123456789", "ak-two-123456789"):
        assert secret not in config
    phone = await browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    try:
        mobile = await phone.new_page()
        await mobile.goto(f"{console.url}/ui")
        await mobile.get_by_label("Admin key").fill(ADMIN_KEY)
        await mobile.get_by_role("button", name="Log in").click()
        await expect(mobile.locator("#t-rps")).not_to_have_text("–", timeout=WAIT_MS)
        # Nothing wider than the screen: tables scroll inside their own box.
        width = await mobile.evaluate("document.documentElement.scrollWidth")
        assert width <= 390
        await mobile.screenshot(path=out / "console-phone.png", full_page=True)
    finally:
        await phone.close()
