"""The notebooks and the app as a student meets them: ``python -m minicosy lab`` (what ``make lab``
runs) serves JupyterLab on 127.0.0.1 and headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium; nothing is downloaded) opens every notebook: none is marked
modified on opening and every committed audio player has a playable source. Notebook 10 then runs
from the UI, and its app synthesises in each mode with streaming on and off: the busy state, one
continuous playback, the whole utterance to replay, a chart on the request's clock for two
sentences, and one-line errors for an empty text and a file that is not audio.

Screenshots go to ``out/browser_test/`` (git-ignored). Jupyter's data, config and runtime folders
are temporary, so the user's trust database and settings are untouched; every process started here
is stopped. Skipped only where Chromium, its driver or Selenium are missing."""
from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import ROOT

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SHOTS = ROOT / "out" / "browser_test"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SHORT = "We walk to the park."
TWO_SENTENCES = ("We walk to the park. " * 15      # over 80 words: the front-end splits it into several sentences
                 + "Then it rains, so we go home and read a book by the window until the sun comes out again.")
MODES = ("zero-shot", "cross-lingual", "instruct", "SFT")
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"       # the notebook in the current tab

if not (CHROMIUM.exists() and DRIVER.exists()):
    pytest.skip("no browser: Debian's chromium and chromium-driver are not installed (scripts/setup.sh installs "
                "them when run as root: apt-get install chromium chromium-driver)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402


def wait_for(check, timeout: float, what: str):
    """Poll ``check`` until it returns something true; fail naming ``what`` after ``timeout`` s."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


class Lab:
    """A JupyterLab server started by ``python -m minicosy lab`` in its own temporary Jupyter folders."""

    def __init__(self, home: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.token = secrets.token_hex(16)
        self.notebooks = {path: path.read_bytes() for path in NOTEBOOKS}
        self.url = f"http://127.0.0.1:{self.port}"
        settings = home / "settings"
        for plugin, value in {"notebook-extension/tracker": {"windowingMode": "none"},   # render every cell
                              "docmanager-extension/plugin": {"autosave": False},      # the files stay as committed
                              "apputils-extension/notification": {"fetchNews": "false",
                                                                  "checkForUpdates": False}}.items():
            path = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
        env = dict(os.environ, **{f"JUPYTER_{k.upper()}_DIR": str(home / k) for k in ("data", "config", "runtime")})
        self.log = open(home / "lab.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "minicosy", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
             f"--IdentityProvider.token={self.token}", "--allow-root", f"--LabApp.user_settings_dir={settings}",
             f"--LabApp.workspaces_dir={home / 'workspaces'}"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: self.api("status") is not None or self.process.poll() is not None, 120, "JupyterLab to start")
        assert self.process.poll() is None, (home / "lab.log").read_text()[-2000:]

    def api(self, path: str, method: str = "GET"):
        request = urllib.request.Request(f"{self.url}/api/{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                body = r.read()
        except OSError:
            return None
        return json.loads(body) if body else {}

    def assert_notebooks_unchanged(self) -> None:
        changed = [p.name for p, content in self.notebooks.items() if p.read_bytes() != content]
        assert not changed, f"JupyterLab rewrote {changed}"

    def idle_kernel(self, notebook: str) -> bool:
        sessions = self.api("sessions") or []
        return any(s["path"].endswith(notebook) and s["kernel"]["execution_state"] == "idle" for s in sessions)

    def shutdown_kernels(self) -> None:
        for session in self.api("sessions") or []:
            self.api(f"sessions/{session['id']}", "DELETE")
        for kernel in self.api("kernels") or []:
            self.api(f"kernels/{kernel['id']}", "DELETE")

    def stop(self) -> None:
        self.shutdown_kernels()
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory, corpus_root):
    server = Lab(tmp_path_factory.mktemp("jupyter"))
    yield server
    server.stop()
    assert server.process.returncode is not None


@pytest.fixture(scope="module")
def browser(lab):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1700",
                "--autoplay-policy=no-user-gesture-required", "--mute-audio"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(str(DRIVER)), options=options)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def open_notebook(browser, lab: Lab, path: Path) -> dict:
    """Open a notebook in a fresh JupyterLab page and wait until all its cells and players are there."""
    nb = json.loads(path.read_text())
    players = sum("<audio" in "".join(o.get("data", {}).get("text/html", "")) for c in nb["cells"]
                  for o in c.get("outputs", []))
    browser.get(f"{lab.url}/lab/tree/notebooks/{path.name}?reset&token={lab.token}")   # only this one open
    wait_for(lambda: browser.execute_script(f"return document.querySelectorAll('{PANEL} .jp-Cell').length")
             == len(nb["cells"]), 90, f"the cells of {path.name}")
    wait_for(lambda: browser.execute_script(f"return document.querySelectorAll('{PANEL} audio').length")
             == players, 60, f"the {players} players of {path.name}")
    return {"players": players}


PLAYERS_JS = """
const audios = Array.from(document.querySelectorAll('{PANEL} audio'));
return audios.map(a => ({src: (a.currentSrc || '').slice(0, 20), ready: a.readyState, error: !!a.error,
                         duration: a.duration}));""".replace("{PANEL}", PANEL)


def test_every_notebook_opens_unmodified_with_playable_players(browser, lab):
    total = 0
    for path in NOTEBOOKS:
        expected = open_notebook(browser, lab, path)["players"]
        players = wait_for(lambda: [p for p in [browser.execute_script(PLAYERS_JS)]
                                    if all(a["ready"] >= 1 or a["error"] or not a["src"] for a in p)], 30,
                           f"the players of {path.name} to load")[0]
        assert len(players) == expected
        silent = [i for i, a in enumerate(players) if not a["src"].startswith("data:audio/") or a["error"]
                  or not a["duration"] > 0]
        assert not silent, f"{path.name}: players {silent} have no playable source: {players}"
        total += len(players)
        wait_for(lambda: lab.idle_kernel(path.name), 90, f"the kernel of {path.name}")
        time.sleep(1.5)                       # the kernel's info reaches the notebook's metadata
        dirty = browser.execute_script("return document.querySelectorAll('.jp-mod-dirty').length")
        assert dirty == 0, f"opening {path.name} marked it modified"
        if path.name.startswith(("00", "10")):
            browser.save_screenshot(str(SHOTS / f"notebook_{path.stem}.png"))
        lab.shutdown_kernels()
    assert total >= 40
    lab.assert_notebooks_unchanged()


APP_JS = """
const app = document.querySelector('.minicosy-app'), player = app.querySelector('.minicosy-player');
const status = player.querySelector('.mc-status'), whole = player.querySelector('.mc-whole audio');
const chart = app.querySelector('.mc-chart'), chartText = app.querySelector('.mc-chart-text');
return {status: status.textContent, error: status.classList.contains('mc-error'),
        busy: status.classList.contains('mc-busy'),
        schedule: JSON.parse(player.dataset.schedule || '[]'), requests: Number(player.dataset.requests || 0),
        players: player.querySelectorAll('audio').length, disabled: app.querySelector('button.mc-go').disabled,
        whole: whole ? {ready: whole.readyState, duration: whole.duration, error: !!whole.error} : null,
        chart: chart && chart.offsetParent ? {text: chartText.textContent, width: chart.naturalWidth} : null,
        watched: window.__mc};"""

WATCH_JS = """
const app = document.querySelector('.minicosy-app'), player = app.querySelector('.minicosy-player');
const button = app.querySelector('button.mc-go');
const mc = window.__mc = {disabled: false, busy: false, elapsed: false, progress: false,
                          cleared: !player.querySelector('.mc-whole audio'), resultBeforeDone: false};
if (window.__mcWatch) window.__mcWatch.disconnect();
window.__mcWatch = new MutationObserver(() => {
  const status = player.querySelector('.mc-status');
  if (button.disabled) mc.disabled = true;
  if (status.classList.contains('mc-busy')) {
    mc.busy = true;
    if (/elapsed/.test(status.textContent)) mc.elapsed = true;
    if (/chunk\\(s\\) done/.test(status.textContent)) mc.progress = true;
    if (player.querySelector('.mc-whole audio')) mc.resultBeforeDone = true;
  }
  if (!player.querySelector('.mc-whole audio')) mc.cleared = true;
});
window.__mcWatch.observe(app, {attributes: true, childList: true, subtree: true, characterData: true});"""


UPLOAD_JS = """
const click = HTMLInputElement.prototype.click;   // a file input's click opens the native dialog: keep it in the page
HTMLInputElement.prototype.click = function () {
  if (this.type !== 'file') return click.call(this);
  this.classList.add('mc-file-dialog');
  document.body.appendChild(this);
};"""


class App:
    """The app in the page, driven through its controls."""

    def __init__(self, browser) -> None:
        self.browser = browser
        self.root = browser.find_element(By.CSS_SELECTOR, ".minicosy-app")

    def state(self) -> dict:
        return self.browser.execute_script(APP_JS)

    def type_text(self, text: str) -> None:
        box = self.root.find_element(By.CSS_SELECTOR, ".mc-text textarea")
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(text if text else Keys.BACKSPACE)
        wait_for(lambda: box.get_attribute("value") == text, 10, "the text to be typed")

    def mode(self, mode: str) -> None:
        button = next(b for b in self.root.find_elements(By.CSS_SELECTOR, ".mc-mode button") if b.text == mode)
        button.click()
        wait_for(lambda: "mod-active" in button.get_attribute("class"), 10, f"mode {mode}")

    def streaming(self, on: bool) -> None:
        box = self.root.find_element(By.CSS_SELECTOR, ".mc-stream input")
        if box.is_selected() != on:
            box.click()

    def synthesise(self, double: bool = False, timeout: float = 180) -> dict:
        before = self.state()["requests"]
        self.browser.execute_script(WATCH_JS)
        button = self.root.find_element(By.CSS_SELECTOR, "button.mc-go")
        time.sleep(0.5)                        # the text and options reach the kernel first
        ActionChains(self.browser).double_click(button).perform() if double else button.click()
        state = wait_for(lambda: [s for s in [self.state()] if s["watched"]["disabled"] and not s["disabled"]
                                  and not s["busy"]], timeout, "the request to end")[0]
        assert state["requests"] == before + 1, "one click, one request"
        w = state["watched"]
        assert w["busy"] and w["elapsed"] and w["cleared"] and not w["resultBeforeDone"], w
        if state["error"]:
            return state
        return wait_for(lambda: [s for s in [self.state()]
                                 if s["whole"] and (s["whole"]["ready"] >= 1 or s["whole"]["error"])],
                        20, "the whole utterance's player to load")[0]


def run_notebook_10(browser, lab: Lab) -> App:
    path = ROOT / "notebooks" / "10_interactive.ipynb"
    open_notebook(browser, lab, path)
    page = wait_for(lambda: [t for t in [browser.find_element(By.CSS_SELECTOR, PANEL).text]
                             if "What to expect from the tiny model" in t], 60, "the saved app to show")[0]
    assert "VBox(" not in page and "model not found" not in page      # a still picture of the app, not a repr
    wait_for(lambda: lab.idle_kernel(path.name), 90, "the kernel of notebook 10")
    next(e for e in browser.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-itemLabel") if e.text == "Run").click()
    wait_for(lambda: [e for e in browser.find_elements(By.CSS_SELECTOR, ".lm-Menu-itemLabel")
                      if e.text == "Run All Cells"], 10, "the menu item Run All Cells")[0].click()
    prompts = "return Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')).map(p => p.textContent)"
    wait_for(lambda: all(re.search(r"\[\d+\]", p) for p in browser.execute_script(prompts)), 400,
             "notebook 10 to run")
    outputs = browser.find_element(By.CSS_SELECTOR, PANEL).text
    assert "Traceback" not in outputs and "Error displaying widget" not in outputs
    return App(browser)


def test_notebook_10_app_in_every_mode(browser, lab, tmp_path):
    app = run_notebook_10(browser, lab)
    browser.execute_script("arguments[0].scrollIntoView()", app.root)
    for mode in MODES:
        app.mode(mode)
        for stream in (True, False):
            app.streaming(stream)
            app.type_text(SHORT)
            state = app.synthesise(double=mode == "zero-shot" and stream)
            assert not state["error"] and state["status"].startswith("✓"), (mode, stream, state["status"])
            chunks = int(re.search(r"\((\d+) chunk", state["status"]).group(1))
            check_one_continuous_playback(state, chunks if stream else 1)
            assert state["chart"] and state["chart"]["width"] > 300, "the latency chart is shown"
            if stream:
                assert state["watched"]["progress"], "progress is shown while chunks arrive"
    # two sentences, streaming: one playback across both, and a chart on one clock
    app.mode("cross-lingual")
    app.streaming(True)
    app.type_text(TWO_SENTENCES)
    state = app.synthesise()
    chart = state["chart"]["text"]
    sentences = re.search(r" in (\d+) sentence\(s\)", chart)
    assert sentences and int(sentences.group(1)) >= 2, chart     # how many: the model's text units decide
    ends = [float(x) for x in re.search(r"ready at ([\d., ]+) s since", chart).group(1).split(", ")]
    assert ends == sorted(ends) and len(set(ends)) == len(ends) == len(state["schedule"]), chart
    assert float(re.search(r"first package after ([\d.]+) s", chart).group(1)) == ends[0]
    check_one_continuous_playback(state, len(ends))
    app.root.screenshot(str(SHOTS / "app.png"))
    # bad input: one line, styled as an error
    app.type_text("")
    state = app.synthesise()
    assert state["error"] and state["status"] == "⚠ text is empty: nothing to synthesise" and state["players"] == 0
    app.type_text(SHORT)
    app.mode("zero-shot")
    junk = tmp_path / "notes.txt"
    junk.write_text("not audio")
    browser.execute_script(UPLOAD_JS)
    app.root.find_element(By.CSS_SELECTOR, ".mc-upload").click()        # the file dialog, as a page element
    browser.find_element(By.CSS_SELECTOR, "input.mc-file-dialog").send_keys(str(junk))
    wait_for(lambda: "notes.txt is not an audio file" in app.root.find_element(By.CSS_SELECTOR, ".mc-upload-info").text,
             20, "the upload's message")
    state = app.synthesise()
    assert state["error"] and state["status"].startswith("⚠ notes.txt is not an audio file"), state["status"]
    assert "\n" not in state["status"] and "BytesIO" not in state["status"]
    app.root.screenshot(str(SHOTS / "app_error.png"))
    lab.assert_notebooks_unchanged()


def check_one_continuous_playback(state: dict, chunks: int) -> None:
    """Every chunk scheduled once, each right after the previous one unless it arrived after that had
    ended; one player of the whole utterance, as long as the chunks together."""
    schedule = state["schedule"]
    assert len(schedule) == chunks, schedule
    for prev, cur in zip(schedule, schedule[1:]):
        end = prev["start"] + prev["duration"]
        assert cur["start"] == pytest.approx(max(end, cur["arrival"] + 0.05), abs=1e-3), schedule
    assert state["players"] == 1 and not state["whole"]["error"]
    assert state["whole"]["duration"] == pytest.approx(sum(c["duration"] for c in schedule), abs=0.01)
