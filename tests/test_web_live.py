"""The API process the stack started, as its users meet it: over HTTP, through the live event
stream, and in a real browser (headless Chromium) showing the dashboard.

The browser test needs Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``,
``/usr/bin/chromedriver``); it installs nothing itself.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from queue_rows import queued_item
from sqlmodel import col, delete, select

from cli.stack import Stack
from visionloop.db import session_scope
from visionloop.events import emit
from visionloop.models import (
    DatasetSnapshot,
    Image,
    LabelingQueueItem,
    Prediction,
    QueueStatus,
    ReviewedLabel,
    Verdict,
)
from visionloop.settings import get_settings

pytestmark = [pytest.mark.stack]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = Path("/tmp/dashboard.png")


@pytest.fixture(scope="module")
def api_url(stack: Stack) -> str:
    return stack.settings.api_url


def test_the_running_api_answers_with_the_platform_state(api_url: str) -> None:
    health = httpx.get(f"{api_url}/api/system/health", timeout=60).json()
    assert health["healthy"] is True, health
    conditions = httpx.get(f"{api_url}/api/retraining/conditions", timeout=60).json()
    assert [c["name"] for c in conditions["conditions"]] == [
        "drift",
        "new_labels",
        "manual_request",
        "champion_age",
        "retrain_running",
        "too_few_labels",
        "cooldown",
    ]
    refused = httpx.post(f"{api_url}/api/retraining/trigger", timeout=30)
    assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"


class SseReader:
    """Reads a server-sent event stream on a thread; ``wait_for`` blocks until an event matches."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.ids: list[int] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, headers or {}), daemon=True)
        self._thread.start()

    def _run(self, url: str, headers: dict[str, str]) -> None:
        # Reads block for at most the server's heartbeat interval and a bit.
        with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(30.0)) as response:
            event_id = None
            for line in response.iter_lines():
                if self._stop.is_set():
                    return
                if line.startswith("id: "):
                    event_id = int(line[4:])
                elif line.startswith("data: "):
                    with self._cond:
                        self.events.append(json.loads(line[6:]))
                        self.ids.append(event_id if event_id is not None else -1)
                        self._cond.notify_all()

    def wait_for(self, predicate: Any, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = next((e for e in self.events if predicate(e)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no matching event within {timeout} s; got {self.events[-5:]}"
                    )
                self._cond.wait(left)

    def close(self) -> None:
        self._stop.set()


def test_the_event_stream_replays_then_goes_live_and_resumes(api_url: str) -> None:
    kind = f"livetest{uuid.uuid4().hex[:6]}"
    old = emit(f"{kind}.before", "emitted before connecting")
    reader = SseReader(f"{api_url}/api/events/stream?replay=5")
    try:
        reader.wait_for(lambda e: e["id"] == old.id)  # replayed on connect
        live = emit(f"{kind}.during", "emitted while connected", {"n": 1})
        seen = reader.wait_for(lambda e: e["id"] == live.id, timeout=20)
        assert seen["kind"] == f"{kind}.during" and seen["payload"] == {"n": 1}
        assert (
            reader.ids == sorted(reader.ids) and reader.ids[-1] == live.id
        )  # ids let a client resume
    finally:
        reader.close()

    # A reconnecting EventSource sends Last-Event-ID and gets exactly what it missed.
    missed = [emit(f"{kind}.missed", f"missed {i}") for i in range(3)]
    resumed = SseReader(
        f"{api_url}/api/events/stream?kind={kind}", headers={"Last-Event-ID": str(live.id)}
    )
    try:
        resumed.wait_for(lambda e: e["id"] == missed[-1].id)
        assert [e["id"] for e in resumed.events] == [m.id for m in missed]
    finally:
        resumed.close()
    bad = httpx.get(f"{api_url}/api/events/stream", headers={"Last-Event-ID": "x"}, timeout=30)
    assert bad.status_code == 422 and bad.json()["error"] == "validation_error"


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(
            f"{CHROMIUM} and {CHROMEDRIVER} are needed for the dashboard test: "
            "apt-get install -y chromium chromium-driver"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="visionloop-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1400,1600",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.timeout(300)
def test_the_dashboard_shows_an_emitted_event_live(api_url: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60, poll_frequency=0.25)
    text = lambda element_id: browser.find_element(By.ID, element_id).text  # noqa: E731

    browser.get(f"{api_url}/dashboard")
    wait.until(lambda _: "on" in browser.find_element(By.ID, "live").get_attribute("class"))
    wait.until(lambda _: text("retrain-state") not in ("", "–"))  # the panels loaded from the API
    wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, "#health li"))
    # The trigger button says whether the conditions would retrain now.
    status = httpx.get(f"{api_url}/api/retraining/status", timeout=30).json()
    should = status["should_retrain"]
    button = browser.find_element(By.ID, "trigger")
    wait.until(lambda _: button.get_attribute("data-should-retrain") == str(should).lower())
    if status["status"] == "running":
        assert button.text == "Retraining…" and not button.is_enabled()
    else:
        assert ("conditions agree" in button.text) is should
    settings = get_settings()
    assert (
        browser.find_element(By.ID, "link-mlflow").get_attribute("href").rstrip("/")
        == settings.mlflow_uri
    )

    # The training panel and the feed change when a flow (here: this process) emits events.
    run = -int(time.time())  # no real retraining run has a negative id
    before = text("training-epoch")
    emit(
        "training.started",
        "training a challenger (browser test)",
        {"retraining_run_id": run, "epochs": 7},
    )
    marker = f"browser test {uuid.uuid4().hex[:8]}"
    emit(
        "training.epoch",
        marker,
        {
            "retraining_run_id": run,
            "epoch": 3,
            "epochs": 7,
            "mAP50": 0.42,
            "mAP50-95": 0.2,
            "box_loss": 1.25,
        },
    )
    wait.until(lambda _: text("training-epoch") == "epoch 3/7 · mAP50 0.420")
    assert text("training-epoch") != before
    assert browser.find_elements(By.CSS_SELECTOR, '#training-chart polyline[data-series="mAP50"]')
    wait.until(lambda _: marker in text("feed"))
    newest = browser.find_element(By.CSS_SELECTOR, "#feed li")
    assert newest.get_attribute("data-kind") == "training.epoch" and marker in newest.text

    # A refused action shows the API's own explanation.
    browser.find_element(By.ID, "token").clear()
    browser.find_element(By.ID, "trigger").click()
    wait.until(lambda _: "VISIONLOOP_API_TOKEN" in text("trigger-result"))

    browser.save_screenshot(str(SCREENSHOT))
    errors = [
        e
        for e in browser.get_log("browser")
        if e["level"] == "SEVERE" and "401" not in e["message"]
    ]
    assert not errors, errors


def _seed_cycle(cycle: str, arms: dict[str, list[int]]) -> list[int]:
    """Reviewed queue items of ``cycle``: per arm, how many of the image's two boxes the champion
    missed on each image; the image ids."""
    names = get_settings().class_names[:2]
    truth = [
        {"cls": i, "name": name, "cx": 0.25 + 0.5 * i, "cy": 0.5, "w": 0.2, "h": 0.2}
        for i, name in enumerate(names)
    ]
    shown = [
        {"cls": b["cls"], "name": b["name"], "conf": 0.9}
        | {"x1": b["cx"] - 0.1, "y1": 0.4, "x2": b["cx"] + 0.1, "y2": 0.6}
        for b in truth
    ]
    ids = []
    with session_scope() as session:
        for arm, misses in arms.items():
            for missed in misses:
                key = uuid.uuid4().hex
                image = Image(content_hash=key, object_key=f"ledger-test/{key}.jpg")
                session.add(image)
                session.flush()
                prediction = Prediction(
                    image_id=image.id, model_version="ledger-test", boxes=shown[missed:]
                )
                session.add(prediction)
                session.flush()
                path = f"s3://images/ledger-test/{key}.jpg"
                session.add(
                    LabelingQueueItem(
                        image_id=image.id,
                        prediction_id=prediction.id,
                        image_path=path,
                        flagged_reason=arm,
                        arm=arm,
                        cycle=cycle,
                    )
                )
                session.add(
                    ReviewedLabel(
                        image_id=image.id, image_path=path, boxes=truth, verdict=Verdict.corrected
                    )
                )
                ids.append(image.id)
        session.commit()
    return ids


@pytest.fixture
def ledger_cycles(stack: Stack) -> Iterator[tuple[str, str]]:
    """Two crafted cycles, removed again (the session's database is shared with other tests):
    one where selection found 5x the champion's errors of the controls, one with too few
    reviewed controls."""
    measured, early = f"measured-{uuid.uuid4().hex}", f"early-{uuid.uuid4().hex}"
    ids = _seed_cycle(early, {"selected": [2] * 4, "control": [2]})
    ids += _seed_cycle(measured, {"selected": [2] * 10, "control": [0] * 6 + [1] * 4})
    try:
        yield measured, early
    finally:
        with session_scope() as session:
            for table in (ReviewedLabel, LabelingQueueItem, Prediction):
                session.exec(delete(table).where(col(table.image_id).in_(ids)))
            session.exec(delete(Image).where(col(Image.id).in_(ids)))
            session.commit()


@pytest.mark.timeout(300)
def test_the_dashboard_shows_the_label_savings_ledger(
    api_url: str, browser: Any, ledger_cycles: tuple[str, str]
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    measured, early = ledger_cycles
    wait = WebDriverWait(browser, 60, poll_frequency=0.25)
    row = lambda cycle: f'#ledger-rows tr[data-cycle="{cycle}"]'  # noqa: E731

    browser.get(f"{api_url}/dashboard")
    wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, row(measured)))
    words = browser.find_element(By.CSS_SELECTOR, row(measured) + " td.words").text
    assert words.startswith(
        "selection finds 5.0x more champion errors per image than random picks (90% interval "
    ), words
    cells = [td.text for td in browser.find_elements(By.CSS_SELECTOR, row(measured) + " td")]
    assert cells[2] == "2.00 (10 of 10 reviewed)" and cells[3] == "0.40 (10 of 10 reviewed)"
    assert cells[4].startswith("5.00x (") and cells[5].startswith("1.60 (")
    # Newest first in the table; the chart marks the measured cycle with its interval.
    rows = browser.find_elements(By.CSS_SELECTOR, "#ledger-rows tr")
    assert [r.get_attribute("data-cycle") for r in rows[:2]] == [measured, early]
    assert browser.find_elements(By.CSS_SELECTOR, f'#ledger-chart g[data-cycle="{measured}"] line')
    assert not browser.find_elements(By.CSS_SELECTOR, f'#ledger-chart g[data-cycle="{early}"]')
    early_words = browser.find_element(By.CSS_SELECTOR, row(early) + " td.words").text
    assert early_words.startswith("not enough reviewed controls yet (1 of 3 needed"), early_words
    summary = browser.find_element(By.ID, "ledger-summary").text
    assert summary.startswith("Over ") and "cycles: " in summary, summary
    assert browser.find_elements(By.CSS_SELECTOR, '#ledger-chart line[data-series="zero"]')
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


@pytest.mark.timeout(300)
def test_the_dashboard_lists_flow_runs_shows_a_log_and_cancels(api_url: str, browser: Any) -> None:
    from prefect import flow, get_run_logger
    from prefect.deployments import run_deployment
    from prefect.logging.handlers import APILogHandler
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    marker = f"dashboard-run-{uuid.uuid4().hex[:8]}"

    @flow(name="dashboard-runs-test")
    def logs_a_marker() -> str:
        from prefect.runtime import flow_run

        get_run_logger().info("%s says hello", marker)
        return str(flow_run.id)

    finished = logs_a_marker()
    APILogHandler().flush()  # the line is on the server before the page asks for it
    later = datetime.now(UTC) + timedelta(hours=6)
    waiting = str(
        run_deployment(
            "label-sync/label-sync", scheduled_time=later, timeout=0, as_subflow=False
        ).id
    )

    wait = WebDriverWait(browser, 60, poll_frequency=0.25)
    row = lambda run_id: f'#run-rows tr[data-run="{run_id}"]'  # noqa: E731
    browser.get(f"{api_url}/dashboard")
    browser.find_element(By.ID, "token").send_keys(get_settings().api_token.get_secret_value())
    wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, row(finished)))
    cells = [td.text for td in browser.find_elements(By.CSS_SELECTOR, row(finished) + " td")]
    assert cells[0] == "dashboard-runs-test" and cells[2] == "Completed", cells

    # Prefect ships logs in batches: ask again until the line is there.
    def log_shows_marker(_: Any) -> bool:
        browser.find_element(By.CSS_SELECTOR, row(finished) + " button").click()
        time.sleep(0.5)
        return f"{marker} says hello" in browser.find_element(By.ID, "run-log").text

    # The table is drawn anew as events arrive: every step finds its row again, and a row
    # replaced between finding and clicking is simply found once more.
    fresh = (StaleElementReferenceException,)
    WebDriverWait(browser, 40, poll_frequency=1, ignored_exceptions=fresh).until(log_shows_marker)
    wait = WebDriverWait(browser, 60, poll_frequency=0.25, ignored_exceptions=fresh)
    wait.until(lambda _: "Scheduled" in browser.find_element(By.CSS_SELECTOR, row(waiting)).text)
    assert "label-sync" in browser.find_element(By.CSS_SELECTOR, row(waiting)).text

    def cancel(_: Any) -> bool:
        found = browser.find_element(By.CSS_SELECTOR, row(waiting))
        found.find_element(By.XPATH, ".//button[text()='cancel']").click()
        return True

    wait.until(cancel)
    wait.until(lambda _: "Cancelled" in browser.find_element(By.ID, "run-result").text)
    wait.until(lambda _: "Cancelled" in browser.find_element(By.CSS_SELECTOR, row(waiting)).text)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


@pytest.mark.timeout(300)
def test_the_dashboard_charts_reviewer_feedback_and_exports_it(api_url: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    tag = f"fb{uuid.uuid4().hex[:6]}"
    ids = []
    with session_scope() as session:
        for i, verdict in enumerate(Verdict):
            image = Image(content_hash=uuid.uuid4().hex * 2, object_key=f"{tag}/{i}.jpg")
            session.add(image)
            session.flush()
            ids.append(image.id)
            session.add(
                ReviewedLabel(
                    image_id=image.id, image_path=image.object_key, verdict=verdict, reviewer=tag
                )
            )
    try:
        today = datetime.now(UTC).date().isoformat()
        bar = f'#feedback-chart g[data-day="{today}"]'
        wait = WebDriverWait(browser, 60, poll_frequency=0.25)
        browser.get(f"{api_url}/dashboard")
        wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, bar))
        reviewed = int(browser.find_element(By.CSS_SELECTOR, bar).get_attribute("data-reviewed"))
        assert reviewed >= 3
        verdicts = {
            r.get_attribute("data-verdict")
            for r in browser.find_elements(By.CSS_SELECTOR, bar + " rect")
        }
        assert verdicts == {"accepted", "corrected", "rejected"}
        assert "reviews in 30 days" in browser.find_element(By.ID, "feedback-summary").text

        # Without a token the export is refused with the API's reason; with one it downloads.
        browser.find_element(By.ID, "token").clear()
        browser.find_element(By.ID, "feedback-csv").click()
        wait.until(lambda _: "token" in browser.find_element(By.ID, "feedback-result").text)
        browser.find_element(By.ID, "token").send_keys(get_settings().api_token.get_secret_value())
        browser.find_element(By.ID, "feedback-csv").click()
        wait.until(lambda _: "exported" in browser.find_element(By.ID, "feedback-result").text)
        errors = [
            e
            for e in browser.get_log("browser")
            if e["level"] == "SEVERE" and "401" not in e["message"]
        ]
        assert not errors, errors
    finally:
        with session_scope() as session:
            session.exec(delete(ReviewedLabel).where(col(ReviewedLabel.image_id).in_(ids)))
            session.exec(delete(Image).where(col(Image.id).in_(ids)))


@pytest.mark.timeout(300)
def test_the_dashboard_shows_the_newest_snapshots_profile(api_url: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from training.profile import profile_entries
    from visionloop.boxes import YoloBox
    from visionloop.formats import Entry, LabeledImage

    names = ["scratch", "dent"]
    entries = [
        Entry(
            LabeledImage(
                image_hash=f"{i:064x}",
                suffix=".jpg",
                width=640,
                height=480,
                # Five scratches to every dent; boxes 4% and 30% of the image wide.
                boxes=(
                    YoloBox(0, 0.3, 0.3, 0.04, 0.04),
                    YoloBox(int(i % 3 == 0), 0.6, 0.6, 0.3, 0.3),
                ),
            ),
            "test" if i < 2 else "train",
        )
        for i in range(9)
    ]
    profile = profile_entries(entries, names, {})
    with session_scope() as session:
        snapshot = DatasetSnapshot(
            manifest_hash=uuid.uuid4().hex * 2,
            kind="training",
            object_prefix="snapshots/browser-test/",
            num_images=9,
            num_train=7,
            num_test=2,
            class_names=names,
            profile=profile,
        )
        session.add(snapshot)
        session.flush()
        snapshot_id = snapshot.id
    try:
        wait = WebDriverWait(browser, 60, poll_frequency=0.25)
        browser.get(f"{api_url}/dashboard")
        wait.until(
            lambda _: f"#{snapshot_id} " in browser.find_element(By.ID, "profile-snapshot").text
        )
        bars = {
            r.get_attribute("data-class"): int(r.get_attribute("data-boxes"))
            for r in browser.find_elements(By.CSS_SELECTOR, "#profile-classes rect")
        }
        assert bars == {"scratch": 9 + 6, "dent": 3}
        facts = browser.find_element(By.ID, "profile-facts").text
        assert "9 (train 7 · val 0 · test 2)" in facts and "18 (2 per image, 0 without)" in facts
        sizes = {
            li.get_attribute("data-bucket"): li.text
            for li in browser.find_elements(By.CSS_SELECTOR, "#profile-sizes li")
        }
        assert sizes["small"] == "small: 9" and sizes["large"] == "large: 9"
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        with session_scope() as session:
            session.exec(delete(DatasetSnapshot).where(col(DatasetSnapshot.id) == snapshot_id))


@pytest.mark.timeout(300)
def test_the_dashboard_gallery_shows_queued_images_with_the_champions_boxes(
    api_url: str, browser: Any
) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with queued_item() as item_id:
        figure = f'#gallery-items figure[data-item="{item_id}"]'
        # The gallery redraws as events arrive: an element found may be replaced before it is
        # read, so each read is tried again on the redrawn one.
        wait = WebDriverWait(
            browser, 60, poll_frequency=0.25, ignored_exceptions=[StaleElementReferenceException]
        )
        text = lambda css: wait.until(  # noqa: E731
            lambda _: browser.find_element(By.CSS_SELECTOR, css).text
        )
        browser.get(f"{api_url}/dashboard")
        browser.find_element(By.ID, "token").clear()
        browser.find_element(By.ID, "gallery-refresh").click()
        wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, figure))
        caption = text(figure + " figcaption")
        assert "pending" in caption and "uncertain" in caption and "selected" in caption
        assert "token needed" in text(figure)

        # With the token the image itself comes, decoded by the browser at the preview's size.
        token = browser.find_element(By.ID, "token")
        token.send_keys(get_settings().api_token.get_secret_value())
        browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", token)
        shown = lambda _: browser.find_elements(By.CSS_SELECTOR, figure + " img")  # noqa: E731
        try:
            wait.until(shown)
        except Exception as exc:
            said = text(figure)
            raise AssertionError(f"no image in the gallery; the figure says {said!r}") from exc
        size = wait.until(
            lambda _: browser.execute_script(
                "const i = arguments[0];"
                "return i.naturalWidth ? [i.naturalWidth, i.naturalHeight] : null",
                browser.find_element(By.CSS_SELECTOR, figure + " img"),
            )
        )
        assert size == [320, 240]
        errors = [
            e
            for e in browser.get_log("browser")
            if e["level"] == "SEVERE" and "401" not in e["message"]
        ]
        assert not errors, errors


@pytest.mark.timeout(300)
def test_the_dashboard_gallery_approves_a_label_by_a_second_reviewer(
    api_url: str, browser: Any
) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with queued_item() as item_id:
        with session_scope() as session:
            item = session.get(LabelingQueueItem, item_id)
            item.status = QueueStatus.labeled
            session.add(
                ReviewedLabel(
                    image_id=item.image_id,
                    image_path=item.image_path,
                    boxes=[],
                    reviewer="ana@example.com",
                    verdict=Verdict.rejected,
                )
            )
        figure = f'#gallery-items figure[data-item="{item_id}"]'
        try:
            # The gallery redraws as events arrive: a button found may be replaced before the
            # click lands, so each click is tried again on the redrawn one.
            wait = WebDriverWait(
                browser,
                60,
                poll_frequency=0.25,
                ignored_exceptions=[StaleElementReferenceException],
            )

            def click(css: str) -> None:
                wait.until(lambda _: browser.find_element(By.CSS_SELECTOR, css).click() or True)

            browser.get(f"{api_url}/dashboard")
            token = browser.find_element(By.ID, "token")
            token.clear()
            token.send_keys(get_settings().api_token.get_secret_value())
            browser.find_element(By.ID, "gallery-refresh").click()
            approve = figure + ' button[data-action="approve"]'
            wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, approve))
            assert browser.find_elements(By.CSS_SELECTOR, figure + ' button[data-action="reject"]')

            result = lambda: browser.find_element(By.ID, "gallery-result").text  # noqa: E731
            click(approve)
            wait.until(lambda _: "enter your name" in result())
            reviewer = browser.find_element(By.ID, "gallery-reviewer")
            reviewer.send_keys("ana@example.com")  # who made the label cannot approve it
            click(approve)
            wait.until(lambda _: "second reviewer" in result())
            reviewer.clear()
            reviewer.send_keys("ben@example.com")
            click(approve)
            wait.until(lambda _: f"item {item_id} is approved" in result())
            wait.until(
                lambda _: (
                    browser.find_element(By.CSS_SELECTOR, figure).get_attribute("data-status")
                    == "approved"
                )
            )
            assert not browser.find_elements(By.CSS_SELECTOR, approve)  # approved once
            with session_scope() as session:
                label = session.exec(
                    select(ReviewedLabel).where(ReviewedLabel.image_id == item.image_id)
                ).one()
                assert label.approved_by == "ben@example.com" and label.approved_at is not None
            errors = [
                e
                for e in browser.get_log("browser")
                if e["level"] == "SEVERE" and "409" not in e["message"]
            ]
            assert not errors, errors
        finally:
            with session_scope() as session:
                session.exec(
                    delete(ReviewedLabel).where(col(ReviewedLabel.image_id) == item.image_id)
                )


def test_the_retrain_report_opens_as_a_page_with_its_pictures(api_url: str, browser: Any) -> None:
    import base64
    import io

    import numpy as np
    from PIL import Image as PILImage
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from training.retrain_report import report_key
    from visionloop.models import RetrainingRun, RetrainStatus
    from visionloop.storage import ObjectStore

    settings = get_settings()
    buffer = io.BytesIO()
    PILImage.fromarray(np.full((40, 80, 3), 90, dtype=np.uint8)).save(buffer, format="PNG")
    picture = base64.b64encode(buffer.getvalue()).decode()
    now = datetime.now(UTC)
    with session_scope() as session:
        run = RetrainingRun(
            trigger="manual",
            reason="browser test",
            status=RetrainStatus.succeeded,
            created_at=now,
            started_at=now,
            finished_at=now,  # the newest finished run: the status panel shows it
            promoted=False,
        )
        session.add(run)
        session.flush()
        run_id = run.id
    page = (
        f"<!doctype html><html><head><title>Retraining run {run_id}</title></head><body>"
        f'<h2>Where they differ most</h2><img id="example" src="data:image/png;base64,{picture}">'
        "</body></html>"
    )
    ObjectStore(settings).put_bytes(
        settings.bucket_reports, report_key(run_id, "html"), page.encode(), "text/html"
    )
    dashboard = browser.current_window_handle
    try:
        wait = WebDriverWait(browser, 60, poll_frequency=0.25)
        browser.get(f"{api_url}/dashboard")
        token = browser.find_element(By.ID, "token")
        token.clear()
        token.send_keys(settings.api_token.get_secret_value())
        link = "#retrain-last a.run-report"
        wait.until(lambda _: f"#{run_id}" in browser.find_element(By.ID, "retrain-last").text)
        browser.find_element(By.CSS_SELECTOR, link).click()
        wait.until(lambda _: len(browser.window_handles) == 2)
        browser.switch_to.window(next(h for h in browser.window_handles if h != dashboard))
        # The page came through the API with the token and shows its inline picture.
        wait.until(lambda _: browser.find_elements(By.ID, "example"))
        image = browser.find_element(By.ID, "example")
        assert browser.execute_script("return arguments[0].naturalWidth", image) == 80
        assert "Where they differ most" in browser.find_element(By.TAG_NAME, "body").text
    finally:
        for handle in browser.window_handles:
            if handle != dashboard:
                browser.switch_to.window(handle)
                browser.close()
        browser.switch_to.window(dashboard)
        with session_scope() as session:
            session.exec(delete(RetrainingRun).where(col(RetrainingRun.id) == run_id))
            session.commit()
