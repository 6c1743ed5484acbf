"""Mouth-to-ear from a real browser's side: headless Chromium calls the app with the web page.

Chromium's fake microphone plays a WAV file (espeak-ng speech, as in bench/e2e.py); the page runs
in its measurement mode (`/?measure&respond=2`: it asks for a response 2 s into the call) and
computes, per tick with output, mouth-to-ear from what the browser knows: its clock, the
`interplay.tick` timing fields, the selected candidate pair's round-trip time and the inbound
audio's jitter-buffer delay from getStats() (see the page's script for the formula). This script
starts the app, drives the page with selenium, and prints and saves the page's figures.
Needs Debian's chromium and chromium-driver. Run: `python -m bench.e2e_browser`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time

import numpy as np

from bench.common import percentiles, print_table, write_json
from bench.e2e import KEY, STAGES, speech, start_app
from examples.call import resample, write_wav


def browser(folder: str, wav: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "chromium"
    for flag in [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={folder}/profile", "--window-size=1400,900",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
        "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
    ]:
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the call lasts")
    parser.add_argument("--respond-after", type=float, default=2.0, help="response.create this long into the call")
    parser.add_argument("--url", default=None, help="a running Interplay (with --api-key); default: start one here")
    parser.add_argument("--api-key", default=KEY)
    parser.add_argument("--jitter-ms", type=float, default=None)
    parser.add_argument("--prebuffer-ms", type=float, default=None)
    parser.add_argument("--background", action="store_true", help="start the app with its background pool (vLLM) too")
    parser.add_argument("--name", default="e2e-browser", help="results file: bench/results/<name>.json")
    args = parser.parse_args(argv)
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        print("needs Debian's chromium and chromium-driver")
        return 2
    from selenium.webdriver.common.by import By

    folder = tempfile.mkdtemp(prefix="interplay-browser-")
    samples, rate = speech(args.seconds + 5, folder)
    wav = f"{folder}/mic.wav"  # Chromium's fake capture wants 48 kHz
    write_wav(wav, resample(samples, rate), 48_000)
    url, stop = (args.url, None) if args.url else start_app(args, folder)
    driver = browser(folder, wav)
    try:
        driver.get(f"{url}/?measure&respond={args.respond_after}")
        driver.find_element(By.ID, "key").send_keys(args.api_key)
        driver.find_element(By.ID, "call").click()
        deadline = time.time() + 30
        while driver.find_element(By.ID, "state").text != "connected" and time.time() < deadline:
            time.sleep(0.2)
        print(f"[browser] call {driver.find_element(By.ID, 'state').text}; {args.seconds:.0f} s ...", flush=True)
        time.sleep(args.seconds)
        result = driver.execute_script("return window.interplayMeasure.summary()")
        driver.find_element(By.ID, "call").click()  # hang up
    finally:
        driver.quit()
        if stop is not None:
            stop()
    rows = result["rows"]
    m2e = percentiles(r["mouth_to_ear_ms"] for r in rows)
    table = [{
        "calls": 1, "turns": m2e["n"], "mouth-to-ear p50": m2e["p50"], "p99": m2e["p99"],
        "longest concealment ms": result["longest_concealment_ms"], "longest out gap ms": result["out_gap_ms"],
        "rtt ms": result["rtt_ms"], "timed from nominal margin": sum(bool(r["approx"]) for r in rows),
    }]
    stages = [{"calls": 1, **{k: percentiles(r[k] for r in rows if r.get(k) is not None)["p50"] for k in STAGES}}]
    print("\nmouth-to-ear in Chromium, ms (the page's own figures):")
    print_table(table, list(table[0]))
    print("\nwhere it goes (p50 ms of each stage):")
    print_table(stages, ["calls", *STAGES])
    targets = [r["jb_target_ms"] for r in rows if r.get("jb_target_ms") is not None]
    if targets:
        print(f"\nChromium's jitter-buffer target delay (mean over the call): {np.median(targets):.0f} ms")
    path = write_json(args.name, {"rows": table, "stages": stages, "page": result})
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
