"""The dashboard at ``GET /``, driven in a real headless Chromium (Debian's ``chromium``, through Playwright).

One service for the module: a redis-server of its own, the real API (uvicorn in a subprocess) twice on the
same Redis and SQLite, once open and once with API keys. Agents' samples are posted over HTTP; what the
trainer would publish (per-sample and per-source weights, its status, a quarantined sample) goes through
``store.feed.TrainerFeed`` under the trainer lease, and three checkpoints with their weight snapshots are
written as the trainer writes them (file, then SQL rows), so the test needs no torch and knows every
number the page should show.

The page is checked for what a person sees: the sources by name, charts with points, sample tables with
their content (written as text: a sample carrying markup shows it, and runs nothing), the quarantine, and
checkpoint links that download. A screenshot goes to tests/artifacts/dashboard.png.

Skipped only when no Chromium is installed (``apt-get install chromium``; .ci/run installs it).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy.orm import Session

from store.checkpoints import checkpoint_path, write_atomic
from store.feed import TrainerFeed
from store.histogram import HIST_EDGES, TOP_MARGIN
from store.keys import Keys
from store.meta import Checkpoint, WeightSnapshot, make_engine
from store.processes import (
    api_argv,
    datadiet_env,
    free_port,
    spawn,
    start_redis_server,
    stop_process_group,
    wait_until_ready,
)

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium installed (apt-get install chromium; .ci/run installs it)"
)

ARTIFACT = Path(__file__).resolve().parent.parent / "artifacts" / "dashboard.png"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]  # fmt: skip
KEYS = "reader-key:read,ops-key:admin"
WAIT_MS = 10_000

XSS_INPUT = '<img src=x onerror="window.__pwned = 1">what is 2+2?'
XSS_TARGET = "<script>window.__pwned = 2</script>4"
# what the trainer "published": a careful agent leaned on, a sloppy one turned away from
SAMPLE_WEIGHT = {"careful-agent": 1.6, "sloppy-agent": 0.02, "web-scraper": 1.0}
HEAVIEST, HEAVIEST_WEIGHT = (
    "scraped-0",
    3.5,
)  # the sample with markup weighs most: the "highest" table shows it
SOURCE_WEIGHTS = {"careful-agent": 0.62, "web-scraper": 0.33, "sloppy-agent": 0.05}
HISTORY = [  # (step, source weights, effective fraction, val_loss) for checkpoints v1..v3
    (10, {"careful-agent": 0.34, "web-scraper": 0.33, "sloppy-agent": 0.33}, 1.0, 2.31),
    (20, {"careful-agent": 0.45, "web-scraper": 0.33, "sloppy-agent": 0.22}, 0.93, 1.74),
    (30, {"careful-agent": 0.55, "web-scraper": 0.33, "sloppy-agent": 0.12}, 0.81, 1.22),
]
LIVE_STEP, LIVE_LOSS = 40, 0.97


def samples() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(12):
        a, b = i % 7, i % 5
        out.append(
            {"id": f"careful-{i}", "source": "careful-agent", "input": f"{a}+{b}=", "target": f"{a + b}"}
        )
        out.append(
            {"id": f"sloppy-{i}", "source": "sloppy-agent", "input": f"{a}+{b}=", "target": f"{a * b + 1}"}
        )
    out.append({"id": "scraped-0", "source": "web-scraper", "input": XSS_INPUT, "target": XSS_TARGET})
    out.append({"id": "scraped-1", "source": "web-scraper", "input": "capital of France?", "target": "Paris"})
    return out


@dataclass
class Service:
    url: str  # the API without keys
    keyed_url: str  # the API with KEYS, on the same Redis and database
    feed: TrainerFeed
    ordinals: dict[str, int]  # sample id -> ordinal
    sources: dict[int, str]  # ordinal -> source
    checkpoint_bytes: dict[int, bytes]

    def publish(self, step: int, sources: dict[str, float]) -> None:
        """Publish weights as the trainer does: every sample's weight (SAMPLE_WEIGHT by source, but
        HEAVIEST_WEIGHT for HEAVIEST, scaled to mean 1) and the summary document."""
        ordinals = sorted(self.sources)
        heaviest = self.ordinals[HEAVIEST]
        per_sample = [HEAVIEST_WEIGHT if o == heaviest else SAMPLE_WEIGHT[self.sources[o]] for o in ordinals]
        scale = len(per_sample) / sum(per_sample)
        per_sample = [w * scale for w in per_sample]
        edges = [*HIST_EDGES, max(HIST_EDGES[-1], *per_sample) + TOP_MARGIN]
        counts = [sum(lo <= w < hi for w in per_sample) for lo, hi in itertools.pairwise(edges)]
        doc = {
            "step": step,
            "updated_at": datetime.now(UTC).isoformat(),
            "method": "bilevel",
            "sources": sources,
            "summary": {
                "count": len(per_sample),
                "effective_fraction": sum(w >= 0.1 for w in per_sample) / len(per_sample),
                "mean": 1.0,
                "histogram": {"edges": edges, "counts": counts},
            },
        }
        self.feed.publish_weights(doc, ordinals, per_sample)


def write_checkpoints(database_url: str, data_dir: Path) -> dict[int, bytes]:
    """Checkpoints v1..v3 with their weight snapshots, as trainer/publish.py registers them."""
    engine = make_engine(database_url)
    files: dict[int, bytes] = {}
    start = datetime.now(UTC) - timedelta(minutes=30)
    try:
        with Session(engine) as session, session.begin():
            for version, (step, sources, effective, loss) in enumerate(HISTORY, start=1):
                data = f"checkpoint {version} ".encode() * (100 * version)
                path = checkpoint_path(data_dir, version)
                files[version] = data
                sha = write_atomic(path, data)
                session.add(Checkpoint(version=version, step=step, sha256=sha, size=len(data), path=str(path),
                                       model_kind="tiny-gpt", config={}, metrics={"val_loss": loss},
                                       created_at=start + timedelta(minutes=10 * version)))  # fmt: skip
                summary = {"count": 26, "effective_fraction": effective, "mean": 1.0}
                session.add(WeightSnapshot(step=step, sources=sources, summary=summary))
    finally:
        engine.dispose()
    return files


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("dashboard")
    redis_server = start_redis_server(root / "redis")
    database_url = f"sqlite:///{root / 'meta.db'}"
    settings = {"redis_url": redis_server.url, "database_url": database_url, "data_dir": str(root / "data")}
    procs: list[subprocess.Popen[bytes]] = []
    client = redis.Redis.from_url(redis_server.url)
    try:
        urls = []  # both APIs start at once (the migration is serialised by its lock)
        for name, extra in (("open", {}), ("keyed", {"api_keys": KEYS})):
            port = free_port()
            log = root / f"api-{name}.log"
            procs.append(spawn(api_argv(port), log=log, env=datadiet_env(**settings, **extra), cwd=root))
            urls.append((f"http://127.0.0.1:{port}", procs[-1], log))
        for url, proc, log in urls:
            wait_until_ready(url, proc, log, 60)

        posted = httpx.post(f"{urls[0][0]}/v1/samples", json={"samples": samples()}, timeout=30)
        assert posted.status_code == 202, posted.text
        feed = TrainerFeed(client, Keys())
        assert feed.lease.acquire(wait=False)
        feed.ensure_group()
        entries = feed.read_new(count=1000)
        sources = {e.ordinal: e.source for e in entries}
        ordinals = {s["id"]: o for s, o in zip(samples(), sorted(sources), strict=True)}
        files = write_checkpoints(database_url, root / "data")
        svc = Service(urls[0][0], urls[1][0], feed, ordinals, sources, files)
        svc.publish(LIVE_STEP, SOURCE_WEIGHTS)
        feed.set_status(
            step=LIVE_STEP, steps_per_s=3.2, val_loss=LIVE_LOSS, updated_at=datetime.now(UTC).isoformat()
        )
        quarantined = ordinals["sloppy-11"]
        feed.quarantine([quarantined], ["sloppy-agent"], ["loss is not finite (nan)"], step=LIVE_STEP - 3)
        del sources[quarantined]
        yield svc
    finally:
        for proc in procs:
            stop_process_group(proc)
        client.close()
        redis_server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright  # dev extra; imported here so collection never needs it

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page (its own sessionStorage); fails the test on any console error or uncaught exception
    (a Content-Security-Policy violation is a console error)."""
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on(
        "console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None
    )
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.problems = problems
    yield page
    context.close()


def wait_for_refreshes(page: Any, n: int) -> None:
    page.wait_for_function(
        "n => Number(document.documentElement.dataset.refreshes || 0) >= n", arg=n, timeout=WAIT_MS
    )


def points(page: Any, chart: str) -> int:
    return int(page.get_attribute(f"#{chart}", "data-points"))


def rows(page: Any, table: str) -> list[list[str]]:
    return page.eval_on_selector_all(
        f"#{table} tbody tr", "trs => trs.map(tr => [...tr.cells].map(td => td.textContent))"
    )


def test_dashboard_shows_sources_charts_samples_quarantine_and_checkpoints(
    service: Service, page: Any
) -> None:
    page.goto(service.url + "/")
    wait_for_refreshes(page, 2)  # the buffer chart and the ingest rate need two readings

    # the sources, by name, heaviest first, with their share now; and in the chart's legend
    chips = page.locator("#source-chips .chip")
    assert chips.locator(".name").all_text_contents() == ["careful-agent", "web-scraper", "sloppy-agent"]
    assert chips.locator(".share").all_text_contents() == ["62.0%", "33.0%", "5.0%"]
    legend = page.inner_text("#chart-sources .u-legend")
    assert all(name in legend for name in SOURCE_WEIGHTS)

    # every chart drew: the three snapshots plus the live point; three checkpoints' losses plus the live one
    assert points(page, "chart-sources") == len(HISTORY) + 1
    assert points(page, "chart-effective") == len(HISTORY) + 1
    assert points(page, "chart-loss") == len(HISTORY) + 1
    assert points(page, "chart-histogram") == len(HIST_EDGES)
    assert points(page, "chart-buffer") >= 2
    for chart in ("sources", "effective", "loss", "histogram", "buffer"):
        assert page.locator(f"#chart-{chart} canvas").count() == 1, chart

    assert page.inner_text("#kpi-buffer") == "25"  # 26 posted, one quarantined
    assert page.inner_text("#kpi-step") == str(LIVE_STEP)
    assert page.inner_text("#kpi-loss") == str(LIVE_LOSS)
    assert page.inner_text("#kpi-quarantined") == "1"
    assert page.inner_text("#kpi-effective") == "53.8%"  # 14 of 26 weigh >= 0.1, the sloppy 12 do not
    assert page.inner_text("#kpi-rate") == "0"  # nothing posted between the two readings

    # the lowest-weighted samples are the sloppy agent's, shown with their content
    lowest = rows(page, "table-lowest")
    assert lowest and all(r[1] == "sloppy-agent" for r in lowest)
    first_id = lowest[0][2]
    sample = httpx.get(f"{service.url}/v1/samples/{first_id}").json()
    assert lowest[0][3:] == [sample["input"], sample["target"]]
    # the highest holds the scraped sample whose content is markup: shown as text, nothing ran
    highest = rows(page, "table-highest")
    assert highest[0][1:] == ["web-scraper", "scraped-0", XSS_INPUT, XSS_TARGET]
    assert page.locator("main img, main script").count() == 0
    assert page.evaluate("window.__pwned") is None

    quarantine = rows(page, "table-quarantine")
    assert [r[1:4] for r in quarantine] == [["sloppy-agent", "sloppy-11", "loss is not finite (nan)"]]

    checkpoints = rows(page, "table-checkpoints")
    assert [r[0] for r in checkpoints] == ["v3", "v2", "v1"]
    assert [r[3] for r in checkpoints] == ["1.22", "1.74", "2.31"]
    links = page.eval_on_selector_all("#table-checkpoints a.download", "as => as.map(a => a.href)")
    assert links == [f"{service.url}/v1/checkpoints/{v}/file" for v in (3, 2, 1)]
    assert httpx.get(links[0]).content == service.checkpoint_bytes[3]

    assert page.get_attribute("#status", "data-state") == "live"
    assert page.is_hidden("#notice")
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACT), full_page=True)
    print(f"dashboard screenshot: {ARTIFACT}")
    assert page.problems == []


def test_dashboard_draws_a_new_point_when_the_trainer_publishes_again(service: Service, page: Any) -> None:
    page.goto(service.url + "/")
    wait_for_refreshes(page, 1)
    before = points(page, "chart-sources")

    try:
        service.publish(LIVE_STEP + 10, {"careful-agent": 0.7, "web-scraper": 0.29, "sloppy-agent": 0.01})
        page.wait_for_function(
            "n => Number(document.querySelector('#chart-sources').dataset.points) > n",
            arg=before,
            timeout=WAIT_MS,
        )
        assert page.locator("#source-chips .share").first.inner_text() == "70.0%"
        assert page.problems == []
    finally:
        service.publish(LIVE_STEP, SOURCE_WEIGHTS)  # as the other tests expect


def test_dashboard_with_api_keys_asks_for_a_key_and_then_shows_what_it_may_read(
    service: Service, page: Any
) -> None:
    assert httpx.get(service.keyed_url + "/").status_code == 200  # the page itself holds no data
    page.goto(service.keyed_url + "/")
    wait_for_refreshes(page, 1)
    assert page.get_attribute("#status", "data-state") == "auth"
    assert "needs an API key" in page.inner_text("#notice")
    assert rows(page, "table-checkpoints") == []
    page.problems.clear()  # the browser logs each refused request (401) as a console error

    page.fill("#api-key", "reader-key")
    page.click("#key-form button[type=submit]")
    page.wait_for_function(
        "() => document.querySelector('#status').dataset.state === 'live'", timeout=WAIT_MS
    )

    assert page.evaluate("sessionStorage.getItem('datadiet.apiKey')") == "reader-key"
    assert page.input_value("#api-key") == ""  # not left on screen
    assert page.locator("#source-chips .chip").count() == 3
    assert [r[0] for r in rows(page, "table-checkpoints")] == ["v3", "v2", "v1"]
    assert points(page, "chart-loss") >= len(HISTORY)
    # sample content is the admin scope's: the read key sees weights and sources, and says so
    lowest = rows(page, "table-lowest")
    assert lowest[0][1] == "sloppy-agent"
    assert lowest[0][3] == "content needs a key with the admin scope"
    assert page.is_hidden("#notice")
    # the download link sends the key (a plain link could not): the browser saves the file
    with page.expect_download() as download:
        page.click("#table-checkpoints a.download >> nth=0")
    assert Path(download.value.path()).read_bytes() == service.checkpoint_bytes[3]
    assert download.value.suggested_filename == "datadiet-v3.safetensors"
