"""Headless Chromium through selenium, on Debian's `chromium` + `chromium-driver` (given by path, so
selenium never downloads a driver), with the waits the UI test needs."""

from __future__ import annotations

import shutil
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait


def find_browser() -> tuple[str | None, str | None]:
    return shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


def chrome(browser: str, driver: str, log: Path) -> webdriver.Chrome:
    options = Options()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-background-networking", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver, log_output=str(log)))


def find(driver: webdriver.Chrome, css: str, timeout: float = 20.0) -> WebElement:
    """The first element matching ``css``, waiting for it to appear."""
    return WebDriverWait(driver, timeout).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def wait_for(driver: webdriver.Chrome, script: str, timeout: float = 20.0):
    """Until the JavaScript ``script`` returns something truthy; that value."""
    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(lambda d: d.execute_script(script),
                                                                     message=f"never true: {script}")


def screenshot(driver: webdriver.Chrome, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    return path
