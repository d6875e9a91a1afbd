"""Headless Chromium for the demo's browser test, driven by Selenium through the system's
chromedriver (Debian's packages chromium and chromium-driver, which `.ci/run` installs):
nothing is downloaded, and the network stays closed."""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--no-first-run", "--disable-quic", "--disable-sync", "--disable-extensions",
    # Without these, Chromium keeps calling Google's hosts, which this machine refuses.
    "--disable-background-networking", "--disable-component-update",
    "--window-size=1400,1100",
)


def _find(names: tuple[str, ...], what: str) -> str:
  for name in names:
    path = shutil.which(name)
    if path:
      return path
  raise RuntimeError(f"{what} not found (looked for {', '.join(names)}): install Chromium and "
                     "its driver, e.g. `apt-get install -y chromium chromium-driver` as in "
                     ".ci/run")


@contextlib.contextmanager
def chromium() -> Iterator[webdriver.Chrome]:
  """A headless Chromium with its own empty profile, removed with the browser at the end."""
  options = webdriver.ChromeOptions()
  options.binary_location = _find(("chromium", "chromium-browser", "google-chrome"), "Chromium")
  for flag in CHROMIUM_FLAGS:
    options.add_argument(flag)
  with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
    options.add_argument(f"--user-data-dir={profile}")
    service = Service(_find(("chromedriver",), "chromedriver"), log_output=os.devnull)
    driver = webdriver.Chrome(service=service, options=options)
    try:
      yield driver
    finally:
      driver.quit()
