"""Open TensorBoard's GRADIENTS tab in headless Chromium and save a screenshot; the browser test and the scale
benchmark drive the tab through these functions.

    python scripts/gradients_tab.py logs/train/runs --out tab.png                  # the first run
    python scripts/gradients_tab.py logs --run <a> --run <b> --out both.png        # two runs side by side

Needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver) and selenium (pip).
"""

import argparse
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def tensorboard(logdir: Path, timeout: float = 90, load_fast: str = "false"):
    """TensorBoard with the GRADIENTS tab (python -m gradlab_tensorboard) on a free loopback port: its base URL.

    load_fast: TensorBoard's own loader for its built-in tabs ("false": in Python, in its server process; "auto":
    its Rust data server, in a process of its own). The GRADIENTS tab reads through gradlab.observe.events either way."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gradlab_tensorboard", "--logdir", str(logdir), "--host",
                             "127.0.0.1", "--port", str(port), f"--load_fast={load_fast}", "--reload_interval", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{base}/data/plugins_listing", timeout=5):
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timeout"
                raise RuntimeError(f"TensorBoard did not come up: {err}")
            time.sleep(0.5)
        yield base
    finally:
        proc.kill()
        proc.wait(timeout=30)


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 1800):
    """A headless Chromium driven by Selenium, with a fresh profile; a clear error when it is not installed."""
    missing = [p for p in (CHROMIUM, DRIVER) if not Path(p).exists()]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not found: the GRADIENTS tab is checked in a real browser. "
                           "Install it with `apt-get install -y chromium chromium-driver` (CI does).")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="gradlab-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver, script: str, timeout: float = 60, every: float = 0.1):
    """Poll a JavaScript expression until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(f"return {script}")
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for: {script}")
        time.sleep(every)


def open_tab(driver, base: str) -> float:
    """TensorBoard at #gradients, then into the tab's iframe until it has drawn: seconds from navigation."""
    from selenium.webdriver.common.by import By

    start = time.monotonic()
    driver.get(f"{base}/#gradients")
    frame = None
    while frame is None:
        frames = driver.find_elements(By.TAG_NAME, "iframe")
        frame = frames[0] if frames else None
        if time.monotonic() - start > 60:
            raise TimeoutError("the GRADIENTS tab's iframe did not appear")
        time.sleep(0.05)
    driver.switch_to.frame(frame)
    wait(driver, "document.body.dataset.rendered", every=0.02)
    return time.monotonic() - start


def select_runs(driver, runs: list[str]) -> None:
    """Tick exactly these runs (at most two: side by side) and wait for the tab to draw them."""
    for run in driver.execute_script("return window.gradients.runs.map(r => r.run)"):
        want = run in runs
        box = driver.execute_script(
            "return document.querySelector(`#top input[data-run=\"${CSS.escape(arguments[0])}\"]`)", run)
        if box.is_selected() != want:
            before = driver.execute_script("return document.body.dataset.rendered")
            box.click()
            wait(driver, f"document.body.dataset.rendered !== {before!r}")


def screenshot(driver, path: Path) -> Path:
    """The whole TensorBoard window (the tab inside it), as a user sees it."""
    driver.switch_to.default_content()
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    from selenium.webdriver.common.by import By

    driver.switch_to.frame(driver.find_elements(By.TAG_NAME, "iframe")[0])
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logdir", type=Path)
    parser.add_argument("--run", action="append", default=[], help="a run to show (twice: side by side)")
    parser.add_argument("--out", type=Path, default=Path("gradients_tab.png"))
    parser.add_argument("--size", default="1400x1800", help="window width x height in pixels")
    args = parser.parse_args(argv)
    width, height = map(int, args.size.split("x"))
    with tensorboard(args.logdir) as base, chromium(width, height) as driver:
        open_tab(driver, base)
        if args.run:
            select_runs(driver, args.run)
        print(screenshot(driver, args.out))


if __name__ == "__main__":
    main()
