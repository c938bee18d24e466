"""The dashboard in a real headless Chromium against the running system.

Needs the Debian packages ``chromium`` and ``chromium-driver`` (scripts/install.sh
installs them) and selenium; skips with the reason otherwise. The screenshot is saved
in the test's tmp dir and, when ``FAIRWAY_TEST_ARTIFACTS`` names a directory, there too.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from services.settings import DEFAULT_MODEL_NAME
from tests.integration.system import ADMIN_KEY, TENANT_KEYS, System

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT_S = 30.0

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(
        "Chromium is not installed: apt-get install -y chromium chromium-driver "
        "(scripts/install.sh does this)",
        allow_module_level=True,
    )

from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,2000", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(arg)
    # The distribution's driver: selenium must not try to download one (no internet).
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(what: str, check: Callable[[], object], timeout: float = WAIT_S) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except StaleElementReferenceException:  # re-rendered between find and read
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"dashboard: timed out waiting for {what}")


def send_traffic(system: System, per_tenant: int) -> threading.Thread:
    """Completions for every tenant plus one request for an unknown model, in the background."""

    def run() -> None:
        with httpx.Client(base_url=system.gateway_url, timeout=60) as http:
            for i in range(per_tenant):
                for tenant, key in TENANT_KEYS.items():
                    http.post(
                        "/v1/completions",
                        headers={"Authorization": f"Bearer {key}"},
                        json={"model": DEFAULT_MODEL_NAME, "prompt": f"{tenant} says hello {i}",
                              "max_tokens": 8 + 6 * i, "ignore_eos": i % 2 == 0},
                    )  # fmt: skip
            http.post(
                "/v1/completions",
                headers={"Authorization": f"Bearer {TENANT_KEYS['acme']}"},
                json={"model": "no-such-model", "prompt": "x"},
            )

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def start_batch(system: System) -> str:
    """A batch of long requests for acme (cancelled once seen): its id."""
    auth = {"Authorization": f"Bearer {TENANT_KEYS['acme']}"}
    rows = [{"custom_id": f"b{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": DEFAULT_MODEL_NAME, "prompt": "A long tale", "max_tokens": 300,
                      "ignore_eos": True}} for i in range(8)]
    with httpx.Client(base_url=system.gateway_url, timeout=30, headers=auth) as http:
        uploaded = http.post("/v1/files", data={"purpose": "batch"},
                             files={"file": ("b.jsonl", "\n".join(json.dumps(r) for r in rows))})
        uploaded.raise_for_status()
        created = http.post("/v1/batches", json={"input_file_id": uploaded.json()["id"],
                                                 "endpoint": "/v1/completions", "completion_window": "24h"})
        created.raise_for_status()
        return created.json()["id"]


def tenant_value(driver: WebDriver, tenant: str, field: str) -> float | None:
    # Read in the page in one go: the table is re-rendered on every poll, so an element
    # found first and read after can already be gone.
    value = driver.execute_script(
        "const c = document.querySelector(arguments[0]); return c ? c.dataset.value : null;",
        f'td[data-tenant="{tenant}"][data-field="{field}"]',
    )
    return float(value) if value is not None else None


def served(driver: WebDriver, tenant: str) -> float | None:
    return tenant_value(driver, tenant, "served_tokens")


def test_dashboard_shows_live_numbers(system: System, browser: WebDriver, tmp_path: Path) -> None:
    started = time.monotonic()
    browser.get(f"{system.gateway_url}/dashboard")
    key_input = browser.find_element(By.ID, "admin-key")
    wait_for("the key form", key_input.is_displayed)

    # A wrong key is refused with the server's message; the right one opens the page.
    key_input.send_keys("not-the-admin-key")
    browser.find_element(By.ID, "login-submit").click()
    error = browser.find_element(By.ID, "login-error")
    wait_for("the 401 message", lambda: "Invalid admin key" in error.text)
    key_input.send_keys(ADMIN_KEY)
    browser.find_element(By.ID, "login-submit").click()
    wait_for("the tenant table", lambda: served(browser, "acme") is not None)
    status = browser.find_element(By.ID, "status")
    assert status.text.startswith("live"), status.text

    send_traffic(system, per_tenant=2).join(WAIT_S)
    first = wait_for("acme's served tokens > 0", lambda: served(browser, "acme"))
    assert first > 0
    send_traffic(system, per_tenant=1).join(WAIT_S)
    wait_for("acme's served tokens to grow", lambda: (served(browser, "acme") or 0) > first)
    assert served(browser, "globex") > 0
    # Each tenant's latency over the last minute, from every gateway's answers.
    wait_for("globex's answered requests", lambda: (tenant_value(browser, "globex", "answered") or 0) >= 3)
    ttft = browser.execute_script(
        "return document.querySelector('td[data-tenant=\"acme\"][data-field=\"ttft_ms\"]').textContent")
    assert ttft != "– / –" and " / " in ttft
    # Today's usage, as the scheduler recorded it; no tenant of this system has rate limits.
    wait_for("acme's tokens today", lambda: (tenant_value(browser, "acme", "tokens_today") or 0) > 0)
    limits = browser.execute_script(
        "return document.querySelector('td[data-tenant=\"acme\"][data-field=\"rate_limits\"]').textContent")
    assert limits == "none"

    # Workers and gateways from heartbeats, the length scatter, the error list: all live.
    wait_for("an alive worker row", lambda: any(
        "alive" in row.text for row in browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr")
    ))  # fmt: skip
    wait_for("this system's gateway, alive", lambda: any(
        row.get_attribute("data-gateway").startswith("gateway:") and "alive" in row.text
        for row in browser.find_elements(By.CSS_SELECTOR, "#gateways tbody tr")
    ))  # fmt: skip
    batch_id = start_batch(system)
    wait_for("the batch in progress", lambda: any(
        row.get_attribute("data-batch") == batch_id and "in_progress" in row.text
        for row in browser.find_elements(By.CSS_SELECTOR, "#batches tbody tr")
    ))  # fmt: skip
    httpx.post(f"{system.gateway_url}/v1/batches/{batch_id}/cancel", timeout=10,
               headers={"Authorization": f"Bearer {TENANT_KEYS['acme']}"}).raise_for_status()
    # A background response queued or running shows in its tenant's row until it ends.
    auth = {"Authorization": f"Bearer {TENANT_KEYS['globex']}"}
    queued = httpx.post(f"{system.gateway_url}/v1/responses", headers=auth, timeout=10, json={
        "model": DEFAULT_MODEL_NAME, "input": "A long tale", "max_output_tokens": 900, "ignore_eos": True,
        "background": True})
    queued.raise_for_status()
    wait_for("globex's background response", lambda: tenant_value(browser, "globex", "background_responses") == 1)
    httpx.post(f"{system.gateway_url}/v1/responses/{queued.json()['id']}/cancel", headers=auth,
               timeout=10).raise_for_status()
    wait_for("it gone once cancelled", lambda: tenant_value(browser, "globex", "background_responses") == 0)
    scatter = browser.find_element(By.ID, "chart-lengths")
    wait_for("points in the length scatter", lambda: int(scatter.get_attribute("data-points") or 0))
    assert "finished requests" in browser.find_element(By.ID, "length-summary").text
    errors = browser.find_element(By.ID, "errors")
    wait_for("the unknown-model error", lambda: "model_not_found" in errors.text)
    assert browser.find_element(By.ID, "chart-rate").get_attribute("data-series") == str(
        len(browser.find_elements(By.CSS_SELECTOR, '#tenants td[data-field="name"]'))
    )
    logs = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    # The one expected console error is the refused wrong key.
    assert all("401" in e.get("message", "") for e in logs), logs

    time.sleep(2.5)  # a few more polls, so the line charts have something to draw
    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    if artifacts := os.environ.get("FAIRWAY_TEST_ARTIFACTS"):
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / "dashboard.png")
    print(f"dashboard screenshot: {shot}")
    assert time.monotonic() - started < 60
