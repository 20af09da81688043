"""The dashboard in real headless Chromium (Debian's chromium + chromedriver, driven by selenium): it loads, lists
the adapters, its numbers change after requests and after a hot load, and it shows the health verdict and reasons."""

import shutil
import tempfile
from pathlib import Path

import httpx
import pytest
from serving import build_served, live_server, make_engine, serve_config

from conftest import missing_asset
from vislora.serve import create_app

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver")
ADMIN = {"Authorization": "Bearer admin-secret"}
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1000")


@pytest.fixture(autouse=True)
def chromium():
    if not (Path(CHROMIUM).exists() and CHROMEDRIVER):
        missing_asset("needs Debian's chromium and chromium-driver (`make test` installs them as root: "
                      "apt-get install chromium chromium-driver)")


@pytest.fixture
def served(tmp_path_factory):
    return build_served(tmp_path_factory)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="vislora-chromium-")
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def table(driver, table_id):
    """The cells of a table, read in one script call (the page redraws it on every poll)."""
    return driver.execute_script(
        f"return [...document.querySelectorAll('#{table_id} tbody tr')].map(r => [...r.cells].map(c => c.textContent))")


def wait_for(driver, condition, what):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30, poll_frequency=0.1).until(lambda d: condition(d), message=what)


def text(driver, element_id):
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent")


def test_dashboard_lists_adapters_and_updates_after_requests(served, browser, tmp_path):
    fields = {"auth": {"admin_token": "admin-secret"}, "batching": {"max_wait_ms": 2}}
    engine = make_engine(served, **fields)
    with live_server(create_app(engine, serve_config(served, **fields))) as url:
        browser.get(f"{url}/dashboard?interval=200")
        wait_for(browser, lambda d: text(d, "status") == "live", "the page never reached /v1/stats")
        wait_for(browser, lambda d: [r[0] for r in table(d, "adapters")] == ["a0", "a1", "a2"], "adapters not listed")
        assert text(browser, "samples") == "0" and text(browser, "adapter-count") == "3"
        assert text(browser, "health") == "ok" and text(browser, "health-reasons") == ""

        with httpx.Client(base_url=url, timeout=60) as http:
            for i, adapter in enumerate(["a0", "a0", "a1", "a0", "a2"]):
                response = http.post("/v1/predict", files={"image": ("x.png", served["images"][i])},
                                     data={"adapter": adapter})
                assert response.status_code == 200
            assert http.post("/v1/predict", files={"image": ("x.png", b"junk")}, data={"adapter": "a0"}
                             ).status_code == 400
            wait_for(browser, lambda d: text(d, "samples") == "5" and text(d, "errors") == "1",
                     "the request and error counts never updated")
            rows = {r[0]: r for r in table(browser, "adapters")}
            assert [rows[n][2] for n in ("a0", "a1", "a2")] == ["3", "1", "1"]
            assert rows["a0"][1] == engine.adapters()[0].digest
            assert float(text(browser, "p50")) > 0
            assert table(browser, "error-kinds") == [["bad_image", "1"]]

            assert http.post("/v1/adapters", json={"name": "a3", "path": str(served["dirs"]["a3"])},
                             headers=ADMIN).status_code == 201
            wait_for(browser, lambda d: text(d, "adapter-count") == "4", "the hot-loaded adapter never appeared")
            assert [r[0] for r in table(browser, "adapters")] == ["a0", "a1", "a2", "a3"]

            rollout = {"weights": {"a0": 1}, "shadow": "a3"}
            assert http.put("/v1/rollouts/canary", json=rollout, headers=ADMIN).status_code == 200
            for i in range(2):
                http.post("/v1/predict", files={"image": ("x.png", served["images"][i])}, data={"adapter": "canary"})
            wait_for(browser, lambda d: [r[:2] for r in table(d, "shadow")] == [["canary", "2"]],
                     "the shadow comparisons never appeared")
            stats = http.get("/v1/stats").json()["shadow"]["canary"]
            agreement, drift = table(browser, "shadow")[0][2:]
            assert agreement == f"{100 * stats['agreement']:.1f}%" and drift == f"{stats['drift_mean']:.4f}"

            engine.health.config = engine.health.config.model_copy(update={"max_memory_bytes": 2**20})
            wait_for(browser, lambda d: text(d, "health") == "degraded", "the degraded health never showed")
            reasons = browser.execute_script(
                "return [...document.querySelectorAll('#health-reasons li')].map(li => li.textContent)")
            assert len(reasons) == 1 and reasons[0].startswith("resident memory ")  # bytes move between polls
            assert reasons[0].endswith("MiB) is above health.max_memory_bytes 1048576")
        browser.save_screenshot(str(tmp_path / "dashboard.png"))
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


@pytest.mark.slow
def test_dashboard_shows_drift_against_the_base_and_feedback(served, browser):
    fields = {"auth": {"admin_token": "admin-secret"}, "batching": {"max_wait_ms": 2}}
    engine = make_engine(served, **fields)
    with live_server(create_app(engine, serve_config(served, **fields))) as url, httpx.Client(base_url=url,
                                                                                            timeout=60) as http:
        rollout = {"weights": {"a0": 1}, "shadow": "@base"}
        assert http.put("/v1/rollouts/drift", json=rollout, headers=ADMIN).status_code == 200
        first, second = served["refs"]["a0"].classes[:2]
        for i, feedback in enumerate(({"label": first}, {"label": second, "click": True}, {"click": False})):
            answer = http.post("/v1/predict", files={"image": ("x.png", served["images"][i])},
                               data={"adapter": "drift"}).json()
            assert http.post("/v1/feedback", json={"request_id": answer["request_id"], **feedback}).status_code == 200
        stats = http.get("/v1/stats").json()
        browser.get(f"{url}/dashboard?interval=200")
        wait_for(browser, lambda d: table(d, "base-cosine") and table(d, "feedback"), "the tables never filled")
        cosine = stats["base_cosine"]["drift"]["a0"]
        assert table(browser, "base-cosine") == [["drift", "a0", "3", f"{cosine['mean']:.4f}", f"{cosine['p5']:.4f}"]]
        arm = stats["feedback"]["rollouts"]["drift"]["arms"]["a0"]
        assert arm["labels"] == 2 and arm["click_feedback"] == 2 and arm["ctr"] == 0.5
        shown = f"{100 * arm['accuracy']:.1f}%"
        assert table(browser, "feedback") == [["drift", "a0", "3", "2", shown, "1/2", "50.0%"],
                                              ["all traffic", "a0", "3", "2", shown, "1/2", "50.0%"]]
        assert text(browser, "feedback-pending") == "0"
