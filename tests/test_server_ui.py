"""The Prefect UI in a real headless Chromium: the deployments page lists the likeness deployments,
a finished pipeline run's stage pages show the stage logs and the grid and selection artifacts, and
Custom run opens on the served profile: a user changes epochs, submits, and the run trains exactly that,
its summary artifact naming the chosen checkpoint.

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
    _wait_for_text(browser, [f"{stage}: 24 processed" for stage in ("scan", "resize", "masks", "captions", "latents")])  # 20 photos + 4 generated
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


def _form_input(driver, label: str, timeout: float = 60):
    """The input of the Custom run form's field labelled `label` (the first one, in form order)."""
    deadline = time.monotonic() + timeout
    xpath = f"//span[@class='schema-form-property__label' and normalize-space()='{label}']"
    while not (labels := driver.find_elements("xpath", xpath)):
        assert time.monotonic() < deadline, f"no form field {label!r} on {driver.current_url}"
        time.sleep(0.5)
    field = labels[0].find_element("xpath", "./ancestor::div[contains(concat(' ', @class, ' '), ' p-label ')][1]")
    return field.find_element("xpath", "./div[contains(@class, 'p-label__body')]//input | ./div[contains(@class, 'p-label__body')]//textarea")


def _click_submit(driver, timeout: float = 60) -> None:
    """Click the form's Submit once it is enabled: the UI disables it while the form still loads or
    validates, and a click on a disabled button is silently lost."""
    deadline = time.monotonic() + timeout
    while True:
        buttons = [b for b in driver.find_elements("css selector", "button") if b.text.strip() == "Submit"]
        if buttons and buttons[0].is_enabled() and buttons[0].get_attribute("aria-disabled") != "true":
            break
        assert time.monotonic() < deadline, f"no enabled Submit button on {driver.current_url}"
        time.sleep(0.5)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", buttons[0])
    buttons[0].click()


def _submit_until_a_run_exists(driver, served, deployment_id: str, before: set, form_url: str, tmp_path,
                               attempts: int = 3, wait: float = 90) -> list[dict]:
    """Click Submit until the run exists. The form validates on the server before it creates the run;
    a click that neither created a run nor left the form (lost on a loaded machine) is repeated, and
    a form that shows validation errors fails with them."""

    def new_runs(seconds: float) -> list[dict]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if new := [r for r in served.runs(deployment_id={"any_": [deployment_id]}) if r["id"] not in before]:
                return new
            time.sleep(0.5)
        return []

    for attempt in range(attempts):
        _click_submit(driver)
        if new := new_runs(wait):
            return new
        if driver.current_url != form_url:  # the UI left the form: it submitted, the run comes late
            if new := new_runs(2 * wait):
                return new
            break
        errors = [e.text for e in driver.find_elements("css selector", "[class*='error'], [role='alert']") if e.text.strip()]
        _screenshot(driver, tmp_path, f"custom-run-submit-{attempt}")
        assert not errors, f"the form refused the change: {errors[:10]}"
    body = driver.find_element("tag name", "body").text
    raise AssertionError(f"Submit created no flow run ({attempt + 1} click(s)); {driver.current_url} ends with:\n{body[-3000:]}")


def test_custom_run_opens_on_the_profile_and_runs_the_change(browser, served, pipeline_run, tmp_path):
    from selenium.webdriver.common.keys import Keys

    deployment = served.deployment("likeness-pipeline/pipeline")
    before = {r["id"] for r in served.runs(deployment_id={"any_": [deployment["id"]]})}
    browser.get(f"{served.url}/deployments/deployment/{deployment['id']}/run")
    _wait_for_text(browser, ["profile", "Choose another profile", "settings"])
    epochs = _form_input(browser, "Epochs (Optional)")
    assert epochs.get_attribute("value") == "1"  # the served profile's value (demo-cpu, serve --set training.epochs=1)
    assert _form_input(browser, "Resolution (Optional)").get_attribute("value") == "64"  # resize: demo-cpu's 64 px
    assert _form_input(browser, "Path").get_attribute("value") == "workspace/demo/photos/person"  # concept 1
    assert _form_input(browser, "Text (Optional)").get_attribute("value") == "ohwx person"  # its caption
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", epochs)
    epochs.send_keys(Keys.CONTROL, "a")
    epochs.send_keys("2")
    assert epochs.get_attribute("value") == "2"
    _screenshot(browser, tmp_path, "custom-run-form")
    form_url = browser.current_url
    new = _submit_until_a_run_exists(browser, served, deployment["id"], before, form_url, tmp_path)
    run = served.wait(new[0]["id"], timeout=900)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    settings = run["parameters"]["settings"]
    assert settings["training"]["epochs"] == 2 and settings["resize"]["resolution"] == 64
    assert {k: v for k, v in settings.items() if k != "training"} == \
        {k: v for k, v in deployment["parameters"]["settings"].items() if k != "training"}  # only that change
    logs = "\n".join(log["message"] for log in served.logs([r["id"] for r in served.run_tree(run["id"])]))
    assert "changed: training.epochs=2" in logs
    assert " for 2 epochs, " in logs, logs[-3000:]  # the trainer ran exactly the changed epoch count

    chosen = run["state"]["message"].split(": ", 1)[0]
    browser.get(f"{served.url}/runs/flow-run/{run['id']}")
    _wait_for_text(browser, [run["name"]])
    _open_tab(browser, "artifacts")
    _wait_for_text(browser, ["summary"])
    _screenshot(browser, tmp_path, "custom-run-artifacts")
    summary = served.api.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run["id"]]},
                                                                        "key": {"any_": ["summary"]}}}).json()[0]
    browser.get(f"{served.url}/artifacts/artifact/{summary['id']}")
    _wait_for_text(browser, ["Chosen checkpoint", Path(chosen).name, "Stage runs and their artifacts"])
    images = browser.find_elements("css selector", "img[alt='overview grid']")
    assert images and browser.execute_script("return arguments[0].naturalWidth", images[0]) > 0
    _screenshot(browser, tmp_path, "custom-run-summary")


def test_selection_table_dashes_render_as_text(browser, served, pipeline_run, tmp_path):
    table = served.api.post("/artifacts/filter", json={"artifacts": {"key": {"any_": ["selection-table"]}},
                                                        "sort": "CREATED_DESC", "limit": 1}).json()[0]
    browser.get(f"{served.url}/artifacts/artifact/{table['id']}")
    _wait_for_text(browser, ["checkpoint", "base"])
    _screenshot(browser, tmp_path, "selection-table")
    assert not browser.find_elements("css selector", "table li"), "a '-' cell rendered as a bullet"
