"""`make demo`'s operations step: `jetyolo run --http` over the demo video; fetch /healthz,
/metrics and one preview frame, and take a headless-chromium screenshot of the page.

  python -m host.http_demo BUNDLE VIDEO OUT_DIR

Writes OUT_DIR/metrics.txt, OUT_DIR/preview.jpg and OUT_DIR/page.png, and prints what it got.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, List, Optional

from host.bench.live import PacedMjpegServer

SERVING = "http: serving "


DEMO_FPS, DEMO_FRAMES = 15.0, 150  # the camera loops over these frames


def start_run(bundle: Path, camera_url: str, name: str, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "device.cli", "run", str(bundle), "--source", camera_url,
         "--source-name", name,
         "--backend", "onnxruntime", "--sink", f"jsonl:{out / 'detections.jsonl'}",
         "--spool-dir", str(out / "spool"), "--stats-interval-s", "1",
         "--http", "127.0.0.1:0", "--http-preview-fps", "10"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_url(process: subprocess.Popen, lines: List[str]) -> Optional[str]:
    if process.stderr is None:  # Popen was asked for stderr=PIPE
        raise RuntimeError("the run has no stderr pipe")
    for line in process.stderr:
        lines.append(line)
        if SERVING in line:
            url = line.split(SERVING, 1)[1].split()[0]
            # keep draining stderr so the run never blocks on a full pipe
            threading.Thread(target=lambda: lines.extend(process.stderr or []),
                             daemon=True).start()
            return url
    return None


def fetch(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return bytes(reply.read())


def wait_healthy(url: str, timeout: float = 60.0) -> str:
    """/healthz once it says 200 (503 until the first frame is through), or its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fetch(url + "/healthz").decode()
        except urllib.error.HTTPError as error:
            if time.monotonic() > deadline:
                return f"{error.code} {error.read().decode()}"
            time.sleep(0.3)


def chromium_available() -> bool:
    return shutil.which("chromium") is not None and shutil.which("chromedriver") is not None


def headless_chromium() -> Any:
    """Debian's chromium through its chromium-driver (never a downloaded browser or driver),
    headless, 900x800 at device scale 1 (screenshots in CSS pixels)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(shutil.which("chromium"))
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--force-device-scale-factor=1", "--window-size=900,800"):
        options.add_argument(argument)
    service = Service(executable_path=str(shutil.which("chromedriver")))
    return webdriver.Chrome(service=service, options=options)


def screenshot(url: str, path: Path) -> str:
    if not chromium_available():
        return "chromium/chromedriver missing (make install adds them): no screenshot"
    browser = headless_chromium()
    try:
        browser.get(url)
        preview = browser.find_element("css selector", "img.preview")
        deadline = time.monotonic() + 15
        while (not browser.execute_script("return arguments[0].naturalWidth", preview)
               and time.monotonic() < deadline):
            time.sleep(0.2)
        time.sleep(1.5)  # a stats message and a few preview frames
        browser.save_screenshot(str(path))
    finally:
        browser.quit()
    return f"page screenshot: {path}"


def main(argv: Optional[List[str]] = None) -> int:
    bundle, video, out = (Path(arg) for arg in (argv or sys.argv[1:])[:3])
    out.mkdir(parents=True, exist_ok=True)
    # The video as a paced camera: the run lasts until it is stopped, however slow the machine
    # (a file source could end before the browser has loaded the page).
    with PacedMjpegServer(video, DEMO_FPS, DEMO_FRAMES) as camera:
        return show(start_run(bundle, camera.url, video.stem, out), video, out)


def show(process: subprocess.Popen, video: Path, out: Path) -> int:
    lines: List[str] = []
    try:
        url = wait_for_url(process, lines)
        if url is None:
            print("".join(lines), file=sys.stderr)
            return 1
        print(f"serving {url}")
        print("GET /healthz:", wait_healthy(url))
        time.sleep(2.5)  # the FPS gauge covers the last 2 s
        metrics = fetch(url + "/metrics").decode()
        (out / "metrics.txt").write_text(metrics)
        shown = [line for line in metrics.splitlines()
                 if line.startswith(("jetyolo_frames_total", "jetyolo_fps",
                                     "jetyolo_model_info", "jetyolo_spool_depth"))]
        print("GET /metrics (a few of its lines):\n  " + "\n  ".join(shown))
        source = video.stem
        (out / "preview.jpg").write_bytes(fetch(f"{url}/preview/{source}.jpg"))
        print(f"GET /preview/{source}.jpg: {out / 'preview.jpg'}")
        print(screenshot(url + "/", out / "page.png"))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
