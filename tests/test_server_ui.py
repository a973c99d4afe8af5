"""The Prefect UI in a real headless Chromium: the deployments page lists the likeness deployments,
and a finished pipeline run's stage pages show the stage logs and the grid and selection artifacts.

Needs the Debian packages `chromium` and `chromium-driver` (`.ci/run` installs them when apt is
available) and selenium (the `test` extra). Without them the test is skipped and says why - never
faked. Screenshots are saved in the test's tmp folder; their paths are printed (`pytest -s`), and
copied into $LIKENESS_ARTIFACTS_DIR when it is set.
"""

import os
import re
import shutil
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _browser_or_skip():
    missing = [name for name in ("chromium", "chromedriver") if not shutil.which(name)]
    if missing:
        pytest.skip(f"no {' and no '.join(missing)} on PATH: `apt-get install -y chromium chromium-driver` "
                    "(.ci/run does it where apt is available)")
    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip("selenium is not installed: pip install -e '.[test]'")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1100",
                     "--disable-gpu", "--no-first-run"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


@pytest.fixture
def browser():
    driver = _browser_or_skip()
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait_for_text(driver, texts: list[str], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        body = driver.find_element("tag name", "body").text
        if all(text in body for text in texts):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"page {driver.current_url} never showed {texts}; it shows:\n{body[:3000]}")
        time.sleep(0.5)


def _open_tab(driver, tab_id: str) -> None:
    """Click a run page's tab (`<li class="p-tab" id="artifacts">`) and wait for the URL to follow."""
    deadline = time.monotonic() + 30
    while not (tabs := driver.find_elements("css selector", f"li.p-tab#{tab_id}")):
        assert time.monotonic() < deadline, f"no '{tab_id}' tab on {driver.current_url}"
        time.sleep(0.5)
    tabs[0].click()
    while "tab=" not in driver.current_url:
        assert time.monotonic() < deadline, f"the '{tab_id}' tab did not open on {driver.current_url}"
        time.sleep(0.2)


def _screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    target = os.environ.get("LIKENESS_ARTIFACTS_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)
    print(f"screenshot: {path}")
    return path


def test_ui_lists_deployments_and_shows_stage_logs_and_artifacts(browser, served, pipeline_run, tmp_path):
    assert pipeline_run["state"]["type"] == "COMPLETED"
    from likeness.deployments.catalog import available_deployments

    browser.get(f"{served.url}/deployments")
    specs = available_deployments()
    body = _wait_for_text(browser, [" Deployments", "likeness-pipeline", "gpu-pool", "cpu-pool"])
    shown = re.search(r"(\d+) Deployments", body)
    assert shown and int(shown.group(1)) >= len(specs)  # other tests may deploy more (the work-pool test)
    assert _screenshot(browser, tmp_path, "deployments").stat().st_size > 10_000
    search = browser.find_element("css selector", "input[type=search]")
    for spec in specs:  # the list pages by 10: find each through the search box, as a user would
        search.clear()
        search.send_keys(spec.name)
        _wait_for_text(browser, [spec.flow_name, *(["Hourly"] if spec.name == "watch" else [])])
    _screenshot(browser, tmp_path, "deployments-watch")

    stages = {run["flow_name"]: run for run in _named(served, served.run_tree(pipeline_run["id"]))}
    browser.get(f"{served.url}/runs/flow-run/{stages['prepare']['id']}")
    _wait_for_text(browser, [f"{stage}: 7 processed" for stage in ("scan", "resize", "masks", "captions", "latents")])
    _screenshot(browser, tmp_path, "prepare-logs")

    for stage, key in (("evaluate", "grid"), ("select", "selection")):
        browser.get(f"{served.url}/runs/flow-run/{stages[stage]['id']}")
        _wait_for_text(browser, [stages[stage]["name"]])
        _open_tab(browser, "artifacts")
        _wait_for_text(browser, ["MARKDOWN", key])
        _screenshot(browser, tmp_path, f"{stage}-artifacts")


def _named(served, runs: list[dict]) -> list[dict]:
    """Flow runs with the name of their flow."""
    names = {}
    for run in runs:
        if run["flow_id"] not in names:
            names[run["flow_id"]] = served.api.get(f"/flows/{run['flow_id']}").json()["name"]
        yield {**run, "flow_name": names[run["flow_id"]]}
