"""Remake docs/explore.png: `jaxgpt explore --model gpt2` in headless chromium, one prompt analysed.

    python scripts/explore_screenshot.py docs/explore.png [--model gpt2]

Needs the web extra and Debian's chromium + chromium-driver (what `scripts/setup.sh` installs).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
import urllib.request

PROMPT = "Hola mundo. Esta es una prueba de tokenización real."


def wait_ready(driver, updates: int | None = None, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
        state = driver.execute_script("return document.body.dataset.state")
        done = driver.execute_script("return window.explorer.updates")
        if state in ("ready", "error") and (updates is None or done >= updates):
            return
        time.sleep(0.3)
    raise SystemExit("the page did not finish within the timeout")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--model", default="gpt2", help="MODEL for jaxgpt explore (gpt2)")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    command = [sys.executable, "-m", "jaxgpt", "explore", "--model", args.model,
               "--port", str(args.port)]  # fmt: skip
    server = subprocess.Popen(command)
    url = f"http://127.0.0.1:{args.port}/"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(1)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,2300"):  # fmt: skip
            options.add_argument(flag)
        service = Service(executable_path=shutil.which("chromedriver"))
        driver = webdriver.Chrome(service=service, options=options)
        try:
            driver.get(url)
            wait_ready(driver)
            driver.find_element(By.ID, "prompt").send_keys(PROMPT)
            driver.find_element(By.ID, "run").click()
            wait_ready(driver, updates=1)
            driver.find_elements(By.CSS_SELECTOR, "#tokens .tok")[-1].click()
            wait_ready(driver)
            driver.save_screenshot(args.out)
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
