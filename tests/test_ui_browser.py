"""The studio page in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium): load the
subjects, register a product and watch its job finish, paint a mask on a room, compare the three sessions.
Writes the screenshot to docs/ui.png."""

import os
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver;"
                " .ci/run installs them)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("litserve")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from adapters_store import Registry  # noqa: E402
from subjectpaint import Studio, Subject  # noqa: E402
from subjectpaint.base import ExemplarInpainter  # noqa: E402
from subjectpaint.demo.scenes import EVAL_SEEDS, HELDOUT_PRODUCT_SEEDS, Product, make_scene, product_photos  # noqa: E402
from subjectpaint.serve.local import local_server  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
PORT = 8793
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    url, blobs = f"sqlite:///{tmp}/registry.db", str(tmp / "blobs")
    with Registry(url, blobs) as reg:
        reg.create_tenant("shop")
        key = reg.issue_key("shop")
        view = reg.for_tenant("shop")
        photos = [p.image.resize((32, 32)) for p in product_photos(Product.from_seed(HELDOUT_PRODUCT_SEEDS[1]), 2)]
        Subject.train(photos, "mug", Studio(ExemplarInpainter.tiny(0), registry=view), registry=view, steps=2,
                      batch_size=2, detector=None, progress=False)
    paths = []
    for i, p in enumerate(photos):
        paths.append(str(tmp / f"photo{i}.png"))
        p.save(paths[-1])
    room = tmp / "room.png"
    make_scene(EVAL_SEEDS[1], 32).room.save(room)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    options = ["--base", "tiny", "--steps", "2", "--train-steps", "3", "--registry", url, "--blobs", blobs]
    with local_server(*options, port=PORT, env=env):
        yield dict(key=key, photos=paths, room=str(room))


def test_studio_page_registers_paints_and_compares(served):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1150,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    wait = WebDriverWait(driver, 180)
    try:
        driver.get(f"http://127.0.0.1:{PORT}/ui#key={served['key']}")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.subject[data-ref="mug@1"]'))
        # 1. register a product: the job's progress reaches 100 %
        driver.find_element(By.ID, "name").clear()
        driver.find_element(By.ID, "name").send_keys("teapot")
        driver.find_element(By.ID, "steps").clear()
        driver.find_element(By.ID, "steps").send_keys("3")
        driver.find_element(By.ID, "photos").send_keys("\n".join(served["photos"]))
        driver.find_element(By.ID, "register").click()
        wait.until(lambda d: d.find_element(By.ID, "jobstate").text.startswith(("done", "failed")))
        assert driver.find_element(By.ID, "jobstate").text == "done: teapot@1"
        assert float(driver.find_element(By.ID, "progress").get_property("value")) == 1.0
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.subject.selected[data-ref="teapot@1"]'))
        # 2. a room, a painted mask
        driver.find_element(By.ID, "room").send_keys(served["room"])
        wait.until(lambda d: d.execute_script("return state.room !== null"))
        canvas = driver.find_element(By.ID, "paint")
        ActionChains(driver).move_to_element_with_offset(canvas, -40, -20).click_and_hold() \
            .move_by_offset(60, 10).move_by_offset(20, 30).release().perform()
        white = driver.execute_script(
            "const d = state.mask.getContext('2d').getImageData(0, 0, state.mask.width, state.mask.height).data;"
            "let n = 0; for (let i = 0; i < d.length; i += 4) n += d[i] > 127; return [n, d.length / 4];")
        assert 0 < white[0] < white[1]                           # part of the room is masked, not all of it
        # 3. the three sessions side by side, each a real image of the room's size
        driver.find_element(By.ID, "compare").click()
        ids = ["out-batch", "out-progressive", "out-dual"]
        wait.until(lambda d: all(d.execute_script(f"return document.getElementById('{i}').naturalWidth") == 32
                                 for i in ids))
        assert driver.find_element(By.ID, "error").text == ""
        sums = driver.execute_script(
            "return arguments[0].map((id) => { const img = document.getElementById(id), c = document.createElement("
            "'canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight; const g = c.getContext('2d');"
            "g.drawImage(img, 0, 0); return Array.from(g.getImageData(0, 0, c.width, c.height).data)"
            ".reduce((a, b) => a + b, 0); });", ids)
        assert len(set(sums)) >= 2                              # the sessions do not all give the same image
        DOCS.mkdir(exist_ok=True)
        driver.save_screenshot(str(DOCS / "ui.png"))
    finally:
        driver.quit()
    shot = np.asarray(PIL.Image.open(DOCS / "ui.png").convert("L"), dtype=np.float32)
    assert shot.shape[0] >= 600 and shot.std() > 10             # a rendered page, not a blank screen
