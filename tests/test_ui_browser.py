"""The web UI end to end in a real headless Chromium, driven by Selenium through the system chromedriver:
the app served on loopback, the story typed into its boxes, Generate clicked, the gallery filled with
the panels, the PDF downloaded, a screenshot taken; and two browser sessions at once.

Needs the Debian packages `chromium` and `chromium-driver` (`scripts/test.sh` installs them); without them
these tests fail, saying so, rather than being skipped.
"""

import io
import os
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from storydiffusion.app.ui import StoryApp
from storydiffusion.world.models import TINY, tiny_model_available

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--window-size=1280,2000",  # tall enough that the galleries' lazy images are on screen
]
WAIT = 90  # s; a run of 4 panels takes a few seconds here, the first page load a few more

CHARACTERS = "[Mia] a girl with curly red hair"
FRAMES = "[Mia], walking in the city #Mia goes out.\n[Mia], running on a beach #By the sea.\n[NC] a forest at night"
OTHER_CHARACTERS = "[Leo] a boy wearing a cap"
OTHER_FRAMES = "[Leo], waving in the snow #Leo waves.\n[Leo], jumping in a forest #Leo jumps.\n[NC] a beach #Bye."

pytestmark = pytest.mark.skipif(not tiny_model_available(), reason="the shipped tiny model's files are missing")


def require_browser() -> None:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(
            f"the browser tests need Chromium and its driver; missing {', '.join(missing)}. Install them with "
            "`apt-get update && apt-get install -y --no-install-recommends chromium chromium-driver` "
            "(`bash scripts/test.sh` does this), and `pip install -e '.[test]'` for selenium.",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def url(tmp_path_factory, one_torch_thread):
    """The app served on 127.0.0.1 on a free port, in this process's threads."""
    require_browser()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = StoryApp(TINY, root=tmp_path_factory.mktemp("ui-runs"), defaults={"steps": 4})
    app.preload()
    demo = app.launch("127.0.0.1", port, block=False, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    app.close()


@pytest.fixture
def browser(tmp_path):
    """Opens headless Chromium sessions (each with its own download folder); closes them all after the test."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    drivers = []

    def open_browser(name: str):
        downloads = tmp_path / f"downloads-{name}"
        downloads.mkdir()
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_experimental_option(
            "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
        )
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        drivers.append(driver)
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        driver.downloads = downloads
        return driver

    yield open_browser
    for driver in drivers:
        driver.quit()


# -- page helpers ----------------------------------------------------------------------------------
def wait_until(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT, poll_frequency=0.2).until(lambda d: condition(d), f"timed out waiting: {what}")


def field(driver, label: str, tag: str = "textarea"):
    """The input of the component labelled `label`, found the way a user finds it: by its label."""
    from selenium.webdriver.common.by import By

    xpath = f"//label[span[@data-testid='block-info' and normalize-space()='{label}']]//{tag}"
    return wait_until(driver, lambda d: d.find_element(By.XPATH, xpath), f"the {label!r} box")


def fill(driver, label: str, text: str, tag: str = "textarea") -> None:
    box = field(driver, label, tag)
    box.clear()
    box.send_keys(text)


def click_generate(driver) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "generate").click()


def message_text(driver) -> str:
    return driver.find_element("id", "message").text


def gallery(driver) -> list[dict]:
    """The panel gallery's images: src, alt (the caption) and decoded size (0 while loading)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#panels img')).map(i => "
        "({src: i.src, alt: i.alt, width: i.complete ? i.naturalWidth : 0, height: i.naturalHeight}))"
    )


def pdf_link(driver) -> str | None:
    from selenium.webdriver.common.by import By

    links = driver.find_elements(By.CSS_SELECTOR, "#pdf a[download]")
    return links[0].get_attribute("href") if links else None


def wait_for_panels(driver, count: int) -> list[dict]:
    """The gallery once it holds `count` decoded images and the run is over (its PDF is offered)."""

    def done(d):
        images = gallery(d)
        return images if len(images) == count and all(i["width"] for i in images) and pdf_link(d) else False

    return wait_until(driver, done, f"{count} panels in the gallery and the PDF")


def fetch(address: str) -> bytes:
    with urllib.request.urlopen(address, timeout=30) as response:
        return response.read()


# -- tests -----------------------------------------------------------------------------------------
def test_story_in_a_real_browser(url, browser, tmp_path):
    driver = browser("one")
    started = time.perf_counter()
    driver.get(url)

    # a format error shows as a message in the page naming the box and line, not a traceback
    fill(driver, "Characters", CHARACTERS)
    fill(driver, "Frames", "[Mia], walking in the city\n[Bob], running on a beach")
    click_generate(driver)
    message = wait_until(driver, lambda d: "unknown character" in message_text(d) and message_text(d), "the error")
    assert "Frames, line 2" in message and "[Bob]" in message and "Traceback" not in driver.page_source

    fill(driver, "Frames", FRAMES)
    click_generate(driver)
    images = wait_for_panels(driver, 3)
    assert [i["alt"] for i in images] == ["Mia goes out.", "By the sea.", "a forest at night"]
    assert all((i["width"], i["height"]) == (64, 64) for i in images)
    panel = Image.open(io.BytesIO(fetch(images[0]["src"])))
    assert panel.format == "PNG" and panel.size == (64, 64)
    assert "3 panels, 1 comic page(s)" in message_text(driver)

    # download the PDF the way a user does: click its link
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#pdf a[download]").click()
    pdf = driver.downloads / "comic.pdf"
    wait_until(driver, lambda d: pdf.is_file() and pdf.stat().st_size > 0, "the PDF download")
    assert pdf.read_bytes().startswith(b"%PDF")

    screenshot = tmp_path / "story.png"
    assert driver.save_screenshot(str(screenshot))
    assert Image.open(screenshot).size[0] > 0
    print(f"browser end to end in {time.perf_counter() - started:.1f} s; screenshot {screenshot}")


def test_two_sessions_at_once_get_their_own_results(url, browser):
    first, second = browser("first"), browser("second")
    for driver, characters, frames, seed in ((first, CHARACTERS, FRAMES, "11"), (second, OTHER_CHARACTERS,
                                             OTHER_FRAMES, "12")):  # fmt: skip
        driver.get(url)
        fill(driver, "Characters", characters)
        fill(driver, "Frames", frames)
        fill(driver, "Seed", seed, tag="input")
    click_generate(first)
    click_generate(second)  # while the first one runs: it waits its turn in the queue

    mine, theirs = wait_for_panels(first, 3), wait_for_panels(second, 3)
    assert [i["alt"] for i in mine] == ["Mia goes out.", "By the sea.", "a forest at night"]
    assert [i["alt"] for i in theirs] == ["Leo waves.", "Leo jumps.", "Bye."]
    assert not {i["src"] for i in mine} & {i["src"] for i in theirs}
    assert pdf_link(first) != pdf_link(second)
    assert fetch(mine[0]["src"]) != fetch(theirs[0]["src"])


def test_a_character_from_an_uploaded_picture(url, browser, tmp_path):
    """The Characters box grows one upload per character; a picture uploaded there draws the character."""
    from selenium.webdriver.common.by import By

    picture = tmp_path / "mia.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(picture)
    driver = browser("pictures")
    driver.get(url)
    fill(driver, "Characters", CHARACTERS)
    fill(driver, "Frames", FRAMES)
    driver.find_element(By.XPATH, "//button[contains(., 'Characters from pictures')]").click()
    upload = wait_until(
        driver,
        lambda d: d.find_element(
            By.XPATH,
            "//*[contains(@class, 'character-pictures')][.//*[contains(., 'Pictures of [Mia]')]]//input[@type='file']",
        ),
        "the upload for [Mia]",
    )
    upload.send_keys(str(picture))
    uploaded = lambda d: "mia\n.png" in d.find_element(By.CLASS_NAME, "character-pictures").text  # noqa: E731
    wait_until(driver, uploaded, "the upload listed")
    click_generate(driver)
    wait_for_panels(driver, 3)
    assert "Drawn from pictures: Mia from 1 picture" in message_text(driver)
