"""The console in a real headless Chromium against the real server (embedded model, database
gateway): keys, usage and billing, revocation, the language switch, the streamed playground,
the operator's top-up, keyboard use, and screenshots of every page at phone and desktop
width (under artifacts/console/)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from console_helpers import MODEL, Seed, expected_cost, session_client

pytestmark = pytest.mark.slow

STATIC = Path(__file__).resolve().parents[2] / "src/inferhub/server/console/static"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


def ui_money(micros: int, currency: str = "USD") -> str:
    """The console's way of writing an amount: 2 to 6 decimals, exact."""
    whole, frac = divmod(abs(micros), 1_000_000)
    digits = f"{frac:06d}".rstrip("0").ljust(2, "0")
    return f"{'-' if micros < 0 else ''}{whole:,}.{digits} {currency}"


@pytest.fixture
def page(browser: Any, console_server: Seed) -> Iterator[Any]:
    """A fresh browser profile (cookies, storage) with clipboard access; fails the test on any
    uncaught script error."""
    context = browser.new_context(viewport=DESKTOP, locale="en-US")
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=console_server.base)
    page = context.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        context.close()
    assert errors == [], errors


def log_in(page: Any, base: str, login: str, password: str) -> None:
    page.goto(f"{base}/console")
    page.get_by_label("Email or account name").fill(login)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.locator('main[data-route^="/"]:not([aria-busy]) h1').wait_for()
    assert page.locator("#nav a[aria-current=page]").count() == 1


def shoot(page: Any, artifacts: Path, name: str, *, full_page: bool = True) -> None:
    """A screenshot (of the whole page, or of the window when a dialog is open); the page
    must not scroll sideways at this width."""
    page.wait_for_timeout(150)  # let the layout settle
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"{name}: {overflow}px wider than the window"
    page.screenshot(path=str(artifacts / f"{name}.png"), full_page=full_page)


def go(page: Any, base: str, route: str) -> None:
    """Open a page of the console and wait until it has drawn its data."""
    page.goto(f"{base}/console#/{route}")
    page.locator(f'main[data-route="/{route}"]:not([aria-busy]) h1').wait_for()


def row_of(page: Any, text: str) -> Any:
    return page.locator("main tbody tr", has_text=text)


def test_key_lifecycle_usage_cost_and_revocation(
    page: Any, console_server: Seed, artifacts: Path
) -> None:
    base, alice = console_server.base, console_server.alice
    log_in(page, base, alice.email, alice.password)
    assert page.locator("#nav").get_by_role("link", name="Accounts").count() == 0

    # Create a key: shown once, with a warning, a copy button and snippets with it.
    page.get_by_label("Name", exact=True).fill("ci-key")
    page.get_by_role("button", name="Create key").click()
    dialog = page.get_by_role("dialog", name="Your new API key")
    secret = dialog.locator("input.key-secret").input_value()
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{43}", secret)
    assert "only time the key is shown" in dialog.get_by_role("alert").inner_text()
    curl = dialog.locator("pre").first.inner_text()
    assert f"Bearer {secret}" in curl and f"{base}/v1/chat/completions" in curl
    assert f"api_key={secret!r}".replace("'", '"') in dialog.locator("pre").nth(1).inner_text()
    shoot(page, artifacts, "flow-key-created-dialog-desktop", full_page=False)
    dialog.locator(".key-row").get_by_role("button", name="Copy").click()
    dialog.get_by_text("Copied to the clipboard.").wait_for()
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied == secret
    dialog.get_by_role("button", name="I have saved the key").click()
    dialog.wait_for(state="detached")  # and the key is gone from the page
    row = row_of(page, "ci-key")
    assert secret[:11] in row.inner_text() and secret not in page.content()

    # Call the API with the copied key through the official client.
    client = openai.OpenAI(api_key=copied, base_url=f"{base}/v1", max_retries=0)
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
    )
    assert reply.usage is not None
    prompt, completion = reply.usage.prompt_tokens, reply.usage.completion_tokens
    cost = expected_cost(prompt, completion)

    # The call is on the usage page: tokens, cost, key, and the balance went down by the cost.
    go(page, base, "usage")
    recent = page.locator("section", has=page.get_by_role("heading", name="Recent requests"))
    first = recent.locator("tbody tr").first
    cells = [c.strip() for c in first.locator("th, td").all_inner_texts()]
    assert cells[1:6] == [MODEL, secret[:11] + "…", str(prompt), str(completion), ui_money(cost)]
    assert cells[6] == f"Completed ({reply.choices[0].finish_reason})"
    balance = page.locator(".stat", has_text="Balance").locator(".stat-value").inner_text()
    assert balance == ui_money(5_000_000 - cost)
    per_key = page.locator("section", has=page.get_by_role("heading", name="Per key"))
    assert "ci-key" in per_key.inner_text() and ui_money(cost) in per_key.inner_text()
    assert page.locator("svg.chart rect").count() >= 2  # today's bars: tokens in and out
    shoot(page, artifacts, "flow-usage-after-call-desktop")

    # CSV export of the same row.
    with page.expect_download() as download:
        page.get_by_role("button", name="Export CSV").click()
    csv = Path(download.value.path()).read_text()
    header, line = csv.splitlines()[:2]
    fields = dict(zip(header.split(","), line.split(","), strict=True))
    assert fields["prompt_tokens"] == str(prompt) and fields["cost_micros"] == str(cost)

    # Revoke it (with a confirmation), and the next call is refused with 401.
    go(page, base, "keys")
    row_of(page, "ci-key").get_by_role("button", name=re.compile("^Revoke")).click()
    confirm = page.get_by_role("dialog", name="Revoke this key?")
    assert "ci-key" in confirm.inner_text()
    shoot(page, artifacts, "flow-revoke-confirm-desktop", full_page=False)
    confirm.get_by_role("button", name="Revoke").click()
    page.get_by_text("Key “ci-key” is revoked.").wait_for()
    assert row_of(page, "ci-key").count() == 0  # hidden unless revoked keys are shown
    page.get_by_label("Show revoked and expired keys").check()
    assert "Revoked" in row_of(page, "ci-key").inner_text()
    with pytest.raises(openai.AuthenticationError) as refused:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
    assert refused.value.status_code == 401
    client.close()


def test_language_switch_shows_chinese_and_is_remembered(
    page: Any, console_server: Seed, artifacts: Path
) -> None:
    base, alice = console_server.base, console_server.alice
    log_in(page, base, alice.email, alice.password)
    page.locator("#lang").select_option("zh-CN")
    nav = page.locator("#nav")
    nav.get_by_role("link", name="用量与账单").wait_for()
    assert page.locator("main:not([aria-busy]) h1").inner_text() == "API 密钥"
    assert page.get_by_role("button", name="创建密钥").count() == 1
    assert page.evaluate("document.documentElement.lang") == "zh-CN"
    page.reload()
    nav.get_by_role("link", name="体验中心").wait_for()  # remembered across loads
    assert page.get_by_role("button", name="退出登录").is_visible()
    for route in ("keys", "usage", "playground"):
        go(page, base, route)
        shoot(page, artifacts, f"zh-{route}-desktop")
    page.set_viewport_size(PHONE)
    shoot(page, artifacts, "zh-playground-phone")
    page.set_viewport_size(DESKTOP)
    # A refusal from the API reads as a sentence in the chosen language, not as JSON.
    go(page, base, "keys")
    page.get_by_role("button", name="创建密钥").click()
    assert "请填写名称" in page.get_by_role("alert").inner_text()
    page.locator("#lang").select_option("en")
    nav.get_by_role("link", name="Usage & billing").wait_for()


def test_playground_streams_a_reply_with_its_usage_and_cost(
    page: Any, console_server: Seed, artifacts: Path
) -> None:
    base, alice = console_server.base, console_server.alice
    log_in(page, base, alice.email, alice.password)
    go(page, base, "playground")
    page.get_by_label("temperature").fill("0")
    page.get_by_label("max_tokens").fill("40")
    message = page.get_by_label("Message", exact=True)
    message.fill("Count from one to twenty, in words.")
    message.press("Enter")
    reply = page.locator(".msg.assistant").last
    # Streaming: text arrives while the reply is still being written.
    page.wait_for_function(
        """() => { const m = [...document.querySelectorAll('.msg.assistant')].pop();
                   return m && m.classList.contains('streaming')
                          && m.querySelector('.msg-text').textContent.length > 0; }"""
    )
    meta = reply.locator(".msg-meta")
    meta.get_by_text("output tokens").wait_for()
    assert "streaming" not in (reply.get_attribute("class") or "")
    m = re.search(r"(\d+) input \+ (\d+) output tokens · cost ([\d.,]+ USD)", meta.inner_text())
    assert m is not None, meta.inner_text()
    prompt, completion = int(m.group(1)), int(m.group(2))
    assert m.group(3) == ui_money(expected_cost(prompt, completion))
    assert reply.locator(".msg-text").inner_text().strip()
    shoot(page, artifacts, "flow-playground-chat-desktop")
    page.set_viewport_size(PHONE)
    shoot(page, artifacts, "flow-playground-chat-phone")
    # The server billed exactly that, through the session's playground key.
    with console_server.admin() as admin:
        rows = admin.get("/admin/usage/requests", params={"account": alice.id, "limit": 1}).json()[
            "data"
        ]
        key = admin.get(f"/admin/keys/{rows[0]['key_id']}").json()
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (prompt, completion)
    assert rows[0]["cost_micros"] == expected_cost(prompt, completion)
    assert key["name"] == "playground (console session)" and key["expires_at"]
    # Logging out revokes that key.
    page.get_by_role("button", name="Log out").click()
    page.get_by_role("button", name="Log in").wait_for()
    with console_server.admin() as admin:
        assert admin.get(f"/admin/keys/{key['id']}").json()["revoked"] is True


def test_operator_tops_up_an_account_and_the_balance_changes(
    page: Any, console_server: Seed, artifacts: Path
) -> None:
    base, op, bob = console_server.base, console_server.operator, console_server.bob
    with console_server.admin() as admin:
        before = admin.get(f"/admin/accounts/{bob.id}").json()["balance_micros"]
    log_in(page, base, op.name, op.password)
    page.locator("#nav").get_by_role("link", name="Accounts").click()
    row = row_of(page, bob.email)
    row.get_by_role("button", name="Top up").click()
    dialog = page.get_by_role("dialog", name="Top up “bob”")
    dialog.get_by_label("Amount (USD)").fill("2.5")
    dialog.get_by_label("Note").fill("PO 42")
    shoot(page, artifacts, "flow-top-up-dialog-desktop", full_page=False)
    dialog.get_by_role("button", name="Top up").click()
    after = before + 2_500_000
    page.get_by_text(f"“bob” now has a balance of {ui_money(after)}.").wait_for()
    assert ui_money(after).removesuffix(" USD") in row_of(page, bob.email).inner_text()
    with console_server.admin() as admin:
        assert admin.get(f"/admin/accounts/{bob.id}").json()["balance_micros"] == after
        ledger = admin.get(f"/admin/accounts/{bob.id}/ledger").json()["data"]
        assert (ledger[-1]["amount_micros"], ledger[-1]["note"]) == (2_500_000, "PO 42")
    # A readable refusal: an amount that is not one.
    row_of(page, bob.email).get_by_role("button", name="Top up").click()
    dialog = page.get_by_role("dialog", name="Top up “bob”")
    dialog.get_by_label("Amount (USD)").fill("1.2345678")
    dialog.get_by_role("button", name="Top up").click()
    assert "at most 6 decimals" in dialog.get_by_role("alert").inner_text()
    dialog.get_by_role("button", name="Cancel").click()
    shoot(page, artifacts, "flow-after-top-up-desktop")


def test_keyboard_only_log_in_and_dialogs(page: Any, console_server: Seed) -> None:
    base, alice = console_server.base, console_server.alice
    page.goto(f"{base}/console")
    page.get_by_label("Email or account name").wait_for()
    assert page.evaluate("document.activeElement.autocomplete") == "username"
    page.keyboard.type(alice.email)
    page.keyboard.press("Tab")
    page.keyboard.type(alice.password)
    page.keyboard.press("Enter")
    page.locator("#nav a[aria-current=page]").wait_for()
    page.reload()
    page.locator("main:not([aria-busy]) h1").wait_for()
    page.keyboard.press("Tab")  # the first stop on the page is the skip link
    assert page.evaluate("document.activeElement.className") == "skip"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.tagName") == "H1"
    # A key made and then a revoke dialog opened and dismissed from the keyboard.
    page.get_by_label("Name", exact=True).focus()
    page.keyboard.type("kbd-key")
    page.keyboard.press("Enter")  # submits the form
    dialog = page.get_by_role("dialog", name="Your new API key")
    dialog.wait_for()
    page.keyboard.press("Escape")
    row_of(page, "kbd-key").get_by_role("button", name=re.compile("^Revoke")).focus()
    page.keyboard.press("Enter")
    confirm = page.get_by_role("dialog", name="Revoke this key?")
    confirm.wait_for()
    assert page.evaluate("document.activeElement.closest('dialog') !== null")
    page.keyboard.press("Escape")
    confirm.wait_for(state="detached")
    assert "Active" in row_of(page, "kbd-key").inner_text()


@pytest.fixture(scope="module")
def carol(console_server: Seed) -> dict[str, str]:
    """A user with two keys and 22 requests (more than a page of the requests table)."""
    base = console_server.base
    carol = {"name": "carol", "email": "carol@example.test", "password": "carol-password-1"}
    with console_server.admin() as admin:
        r = admin.post("/admin/accounts", json={**carol, "credit_micros": 3_000_000})
        assert r.status_code == 201, r.text
    with session_client(base, carol["email"], carol["password"]) as c:
        for name, models, calls in (("web app", [MODEL], 2), ("batch jobs", [], 20)):
            body = {"name": name, "allowed_models": models, "rpm_limit": 600}
            secret = c.post("/v1/dashboard/keys", json=body).json()["secret"]
            with openai.OpenAI(api_key=secret, base_url=f"{base}/v1", max_retries=0) as ai:
                for _ in range(calls):
                    ai.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
                    )
    return carol


def test_recent_requests_page_through(
    page: Any, console_server: Seed, carol: dict[str, str]
) -> None:
    log_in(page, console_server.base, carol["email"], carol["password"])
    go(page, console_server.base, "usage")
    recent = page.locator("section", has=page.get_by_role("heading", name="Recent requests"))
    assert recent.locator("tbody tr").count() == 20
    assert recent.get_by_role("button", name="Previous").is_disabled()
    recent.get_by_role("button", name="Next").click()
    recent.get_by_text("Page 2").wait_for()
    assert recent.locator("tbody tr").count() == 2
    assert recent.get_by_role("button", name="Next").is_disabled()
    recent.get_by_role("button", name="Previous").click()
    recent.get_by_text("Page 1").wait_for()
    assert recent.locator("tbody tr").count() == 20


def test_every_page_at_phone_and_desktop_width(
    page: Any, console_server: Seed, carol: dict[str, str], artifacts: Path
) -> None:
    """Screenshots of every page with some data on it: Carol's pages, then the operator's."""
    base, op = console_server.base, console_server.operator
    pages = {
        (carol["email"], carol["password"]): ["keys", "usage", "playground", "account"],
        (op.name, op.password): ["admin/accounts", "admin/prices", "admin/usage"],
    }
    page.set_viewport_size(PHONE)
    page.goto(f"{base}/console")
    shoot(page, artifacts, "login-phone")
    page.set_viewport_size(DESKTOP)
    shoot(page, artifacts, "login-desktop")
    for (login, password), routes in pages.items():
        log_in(page, base, login, password)
        for size, suffix in ((PHONE, "phone"), (DESKTOP, "desktop")):
            page.set_viewport_size(size)
            for route in routes:
                go(page, base, route)
                alerts = page.get_by_role("alert")
                assert alerts.count() == 0, alerts.all_inner_texts()
                shoot(page, artifacts, f"{route.replace('/', '-')}-{suffix}")
        page.get_by_role("button", name="Log out").click()
        page.get_by_role("button", name="Log in").wait_for()


def test_every_string_has_both_languages(page: Any, console_server: Seed) -> None:
    page.goto(f"{console_server.base}/console")
    en, zh = page.evaluate(
        """async () => { const m = await import('/console/static/js/i18n.js');
                         return [Object.keys(m.DICTS.en), Object.keys(m.DICTS['zh-CN'])]; }"""
    )
    # Error codes may be translated in one language only (the server's message is the rest).
    assert {k for k in en if not k.startswith("err.code.")} == {
        k for k in zh if not k.startswith("err.code.")
    }
    used = set()
    for path in STATIC.rglob("*.js"):
        used |= set(re.findall(r"\bt\(\s*\"([\w.]+)\"", path.read_text()))
    assert used and used <= set(en), sorted(used - set(en))


def test_isolation_through_the_console_api_with_a_session_cookie(console_server: Seed) -> None:
    """Alice's session cannot read or revoke Bob's key or read his usage on the live server."""
    base, alice, bob = console_server.base, console_server.alice, console_server.bob
    with session_client(base, bob.email, bob.password) as bob_c:
        created = bob_c.post("/v1/dashboard/keys", json={"name": "bob-only"}).json()
        key_id, secret = created["key"]["id"], created["secret"]
        with openai.OpenAI(api_key=secret, base_url=f"{base}/v1", max_retries=0) as bob_ai:
            bob_ai.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
            )
    with session_client(base, alice.email, alice.password) as alice_c:
        assert key_id not in alice_c.get("/v1/dashboard/keys").text
        assert alice_c.get(f"/v1/dashboard/keys/{key_id}").status_code == 404
        assert alice_c.post(f"/v1/dashboard/keys/{key_id}/revoke").status_code == 404
        rows = alice_c.get("/v1/dashboard/usage/requests", params={"key_id": key_id}).json()
        assert rows["data"] == []
        assert alice_c.get("/admin/usage/requests").status_code == 403
        assert alice_c.get(f"/admin/accounts/{bob.id}").status_code == 403
        # Without the CSRF header the cookie alone changes nothing.
        with httpx.Client(base_url=base, cookies=alice_c.cookies, timeout=30) as plain:
            assert plain.post("/v1/dashboard/keys", json={"name": "x"}).status_code == 403
    with console_server.admin() as admin:
        assert admin.get(f"/admin/keys/{key_id}").json()["revoked"] is False
