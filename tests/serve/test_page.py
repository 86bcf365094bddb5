"""The results page in a real headless Chromium (Debian's chromium and chromium-driver, driven by
Selenium): a query typed into the box shows the retriever's hits with their images, the
attention picture of a hit on a click, and a k beyond the gallery as the server's one-line
message."""

import shutil
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the dev extra) missing")
image = pytest.importorskip("PIL.Image", reason="Pillow (the plots extra) missing")
pytest.importorskip("fastapi")
from scan_deploy.runtime.retriever import Retriever  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tests.cli_runner import run_cli  # noqa: E402
from tests.serve.server_process import running_server  # noqa: E402

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them with apt-get)",
)


@pytest.fixture(scope="module")
def gallery(trained, tmp_path_factory):
    """The trained test split indexed with a picture per image (a plain colour each)."""
    data, _, bundle = trained
    root = tmp_path_factory.mktemp("page")
    (root / "test_images").mkdir()
    for name in ("test_ims.npy", "test_caps.txt"):
        shutil.copy(data / name, root / name)
    for i in range(400):
        color = (40 + i % 200, 80, 200 - i % 150)
        image.new("RGB", (96, 72), color).save(root / "test_images" / f"{i}.png")
    out = root / "gallery"
    done = run_cli("index", bundle, "--features", root / "test_ims.npy", "--captions",
                   root / "test_caps.txt", "--out", out)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out, (root / "test_caps.txt").read_text().splitlines()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1200,1600"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _search(browser, text: str, k: int) -> None:
    box = browser.find_element(By.ID, "query")
    box.clear()
    box.send_keys(text)
    count = browser.find_element(By.ID, "k")
    count.clear()
    count.send_keys(str(k))
    box.send_keys(Keys.ENTER)


def test_a_typed_query_shows_the_retrievers_hits(gallery, browser, tmp_path):
    path, captions = gallery
    query = captions[10]
    with Retriever.open(None, path) as retriever:
        expected = retriever.search_text([query], k=5)[0]
    with running_server(path) as (url, _):
        browser.get(url + "/")
        _search(browser, query, 5)
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "li.hit")) == 5)
        hits = browser.find_elements(By.CSS_SELECTOR, "li.hit")
        assert [h.get_attribute("data-id") for h in hits] == [h.id for h in expected]
        scores = [h.find_element(By.CLASS_NAME, "score").text for h in hits]
        assert scores == [f"score {h.score:.4f}" for h in expected]
        assert hits[0].find_element(By.CLASS_NAME, "text").text == expected[0].text
        thumbnail = hits[0].find_element(By.CSS_SELECTOR, "img.thumb")
        wait.until(lambda b: b.execute_script("return arguments[0].naturalWidth", thumbnail) == 96)
        assert browser.find_element(By.ID, "status").text.startswith("5 hits in ")
        hits[0].find_element(By.CLASS_NAME, "explain").click()
        picture = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "img.attention"))
        wait.until(lambda b: b.execute_script("return arguments[0].naturalWidth", picture) > 500)
        browser.save_screenshot(str(tmp_path / "page.png"))
        _search(browser, query, 401)  # more than the gallery's 400 images
        wait.until(lambda b: "error" in b.find_element(By.ID, "status").get_attribute("class"))
        assert browser.find_element(By.ID, "status").text.startswith("k: expected 1..400")
        assert browser.find_elements(By.CSS_SELECTOR, "li.hit") == []
    assert Path(tmp_path / "page.png").stat().st_size > 10_000
