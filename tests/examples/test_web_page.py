"""The browser page completes a call: headless Chromium, its fake microphone fed from a WAV."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import API_KEY
from tests.waits import wait_for

pytestmark = pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")), reason="needs Debian's chromium and chromium-driver")


# Records each fetch's path and Authorization header as the page sends it.
SPY_ON_FETCH = """
window.__sent = [];
const realFetch = window.fetch;
window.fetch = (url, options = {}) => {
  window.__sent.push([new URL(url, location.href).pathname, (options.headers || {}).Authorization || ""]);
  return realFetch(url, options);
};
"""


@pytest.fixture
def browser(tmp_path, speech_wav):
    driver = start_browser(tmp_path, speech_wav)
    yield driver
    driver.quit()


def start_browser(tmp_path, wav: str):
    """Headless Chromium whose microphone plays `wav` in a loop."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    wav48 = tmp_path / "mic.wav"  # Chromium's fake capture wants 48 kHz
    subprocess.run(["sox", wav, "-r", "48000", "-c", "1", str(wav48)], check=True)
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,900",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav48}", "--autoplay-policy=no-user-gesture-required",
        # media over loopback only (the server drops any other candidate)
        "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
    ]:
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def click_call(browser, timeout=90.0):
    """Call, and call again while the server answers 503 "capacity" (an interaction actor on a
    busy machine refuses new sessions while its steps run hot); the page keeps its secret."""
    from selenium.webdriver.common.by import By

    deadline = time.time() + timeout
    while True:
        browser.find_element(By.ID, "call").click()
        while browser.find_element(By.ID, "state").text in ("idle", "asking for the microphone…", "new", "connecting"):
            if time.time() > deadline:
                return
            time.sleep(0.2)
        refused = browser.find_element(By.ID, "state").text == "failed" and '"capacity"' in browser.find_element(By.ID, "log").text
        if not refused or time.time() > deadline:
            return
        time.sleep(1.0)


def test_the_page_completes_a_call(app_url, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(app_url + "/")
    browser.execute_script(SPY_ON_FETCH)
    browser.find_element(By.ID, "key").send_keys(API_KEY)
    click_call(browser)
    log = lambda: browser.find_element(By.ID, "log").text  # noqa: E731
    wait_for(lambda: "session.updated" in log(), interval=0.2, message=log)
    # a few seconds of the call: the timeline got a column per tick, and it heard the WAV
    wait_for(lambda: browser.execute_script("return ticks.length >= 8 && ticks.some((t) => t.in_level > 0.001)"), interval=0.2, message=log)
    assert browser.find_element(By.ID, "state").text == "connected", log()
    assert "session.created" in log() and "session.updated" in log() and "error" not in log()
    browser.find_element(By.ID, "text").send_keys("hello model")
    browser.find_element(By.CSS_SELECTOR, "#say button").click()
    wait_for(lambda: "response.created" in log(), interval=0.2, message=log)
    assert "conversation.item.added" in log()  # typed text asked for an answer
    wait_for(lambda: browser.execute_script("return ticks.some((t) => t.out_level > 0.001)"), interval=0.2, message=log)  # and it was spoken
    browser.save_screenshot(str(tmp_path / "call.png"))
    browser.find_element(By.ID, "call").click()  # hang up
    assert browser.find_element(By.ID, "state").text == "idle"
    # The key was traded once for a client secret and is kept nowhere; the call and its hang-up
    # carried only the secret.
    wait_for(lambda: any(path.endswith("/hangup") for path, _ in browser.execute_script("return window.__sent")), interval=0.2)
    sent = browser.execute_script("return window.__sent")
    assert [path for path, _ in sent][:2] == ["/v1/realtime/client_secrets", "/v1/realtime/calls"], sent
    assert sent[0][1] == f"Bearer {API_KEY}"
    assert all(auth.startswith("Bearer ek_") for _, auth in sent[1:]) and sent[-1][0].endswith("/hangup"), sent
    assert browser.find_element(By.ID, "key").get_attribute("value") == ""
    assert API_KEY not in browser.execute_script("return JSON.stringify(secret) + document.documentElement.outerHTML")


def test_the_page_measures_mouth_to_ear(app_url, browser):
    """In its measurement mode the page asks for a response and times each spoken tick itself."""
    from selenium.webdriver.common.by import By

    browser.get(app_url + "/?measure&respond=1")
    browser.find_element(By.ID, "key").send_keys(API_KEY)
    browser.find_element(By.ID, "call").click()
    wait_for(lambda: browser.find_element(By.ID, "state").text == "connected", interval=0.2)

    def measured():  # the summary, once it covers enough polls and spoken ticks
        summary = browser.execute_script("return window.interplayMeasure.summary(0)")
        return summary if summary["polls"] >= 20 and summary["turns"] >= 3 else None

    result = wait_for(measured, interval=0.5)
    browser.find_element(By.ID, "call").click()
    row = result["rows"][-1]
    assert result["p50"] in [r["mouth_to_ear_ms"] for r in result["rows"]]  # the median of the spoken ticks' figures ...
    assert all(r["mouth_to_ear_ms"] > 0 for r in result["rows"])  # ... each heard after it was said
    assert row["caller buffer"] > 0  # the browser's jitter buffer is in it
    parts = sum(row[k] for k in ("uplink", "server receive buffer", "gather", "step", "deliver", "playout", "downlink", "caller buffer"))
    assert abs(parts - row["mouth_to_ear_ms"]) < 1  # the stages add up to the figure


@pytest.fixture
def served(tmp_path):
    """`interplay serve` as a user starts it, on the embedded defaults (so the shipped model), with
    a key; its own local Ray cluster. The background pool has its own tests and stays off here."""
    with serve(tmp_path, 8125) as url:
        yield url


@contextlib.contextmanager
def serve(tmp_path, port: int, model: str = ""):
    """`interplay serve --config` on a config of the defaults plus a key, a log under `tmp_path`,
    the pool off and `model` (a YAML flow mapping for the `model` section, if any); -> its URL."""
    exe = Path(sys.executable).parent / "interplay"
    if not exe.exists():
        pytest.skip("package not installed in this environment")
    config = tmp_path / "serve.yaml"
    config.write_text(f"log: {{root: {tmp_path / 'log'}}}\nhttp: {{port: {port}}}\nauth: {{api_keys: [{API_KEY}]}}\n"
                      "background: {enabled: false}\n" + (f"model: {model}\ninteraction: {{max_sessions: 2}}\n" if model else ""))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([str(exe), "serve", "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True).start()
    deadline = time.time() + 240
    while not any("running" in line for line in lines) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    try:
        assert any("running" in line for line in lines), "".join(lines)[-3000:]
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_the_page_calls_a_moshi_family_model(tmp_path, speech_wav):
    """`model: {family: moshi, path: DIR}` on a random-weight directory in Kyutai's layout made by
    the documented command: the page's call runs end to end on the Moshi engine's 80 ms ticks."""
    pytest.importorskip("moshi")
    ckpt = tmp_path / "moshi-random"
    subprocess.run([sys.executable, "-m", "models.moshi.random_checkpoint", str(ckpt)], check=True, capture_output=True)
    from selenium.webdriver.common.by import By

    with serve(tmp_path, 8126, f"{{family: moshi, path: {ckpt}}}") as url:
        browser = start_browser(tmp_path, speech_wav)
        try:
            browser.get(url + "/")
            browser.find_element(By.ID, "key").send_keys(API_KEY)
            click_call(browser)
            log = lambda: browser.find_element(By.ID, "log").text  # noqa: E731
            wait_for(lambda: "session.updated" in log(), interval=0.2, message=log)
            # 2.4 s of the call: 30 ticks (80 ms each) came back, and they heard the WAV
            wait_for(lambda: browser.execute_script("return ticks.length >= 30 && ticks.some((t) => t.in_level > 0.001)"),
                     interval=0.2, message=log)
            assert browser.find_element(By.ID, "state").text == "connected", log()
            assert "error" not in log()
            browser.find_element(By.ID, "call").click()  # hang up
            assert browser.find_element(By.ID, "state").text == "idle"
        finally:
            browser.quit()


@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="needs espeak-ng for the spoken question")
def test_the_shipped_model_answers_a_spoken_question_on_its_own(served, tmp_path):
    """The page's microphone asks a question, then stays quiet; the shipped model answers in
    speech, with no response.create and nothing typed: it took the turn itself."""
    from selenium.webdriver.common.by import By

    question = tmp_path / "question.wav"
    subprocess.run(["espeak-ng", "-w", str(tmp_path / "q.wav"), "What is the capital of France?"], check=True)
    subprocess.run(["sox", str(tmp_path / "q.wav"), "-r", "16000", str(question), "pad", "0.5", "6"], check=True)  # then 6 s of quiet
    browser = start_browser(tmp_path, str(question))
    try:
        browser.get(served + "/")
        browser.find_element(By.ID, "key").send_keys(API_KEY)
        click_call(browser)
        deadline = time.time() + 40
        spoke = False
        while time.time() < deadline and not spoke:
            time.sleep(0.5)
            spoke = browser.execute_script(
                "const i = ticks.findIndex((t) => t.in_level > 0.01);"  # the question reached the model
                "return i >= 0 && ticks.slice(i).filter((t) => t.out_level > 0).length >= 5")  # then a second of speech
        log = browser.find_element(By.ID, "log").text
        levels = browser.execute_script("return ticks.map((t) => [t.in_level, t.out_level])")
        browser.find_element(By.ID, "call").click()
    finally:
        browser.quit()
    assert spoke, (log[-2000:], levels)
    assert "error" not in log and "→ response.create" not in log and "→ conversation.item.create" not in log
    # It listens too: most of a call that is mostly quiet is not its speech.
    assert sum(1 for _, out in levels if out > 0) < 0.8 * len(levels), levels
