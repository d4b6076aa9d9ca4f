"""The web page at `/`, driven by a real browser (Debian's chromium through Playwright) against
the Serve app on the shared local Ray cluster, serving the tiny_run checkpoint.

Playwright never downloads a browser here: it launches /usr/bin/chromium (`make test` installs
it with apt-get) with the flags of shared/ENV.md and a fresh profile directory.
"""

from __future__ import annotations

import base64
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from playwright.sync_api import BrowserContext, Page, expect, sync_playwright
from safetensors.torch import load as load_safetensors

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
PROMPT = ["Sneaker", "digit 4", "Bag"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint(ray_cluster: dict, tiny_run: Path) -> Iterator[str]:
    """The Tina Serve app (one generator replica, autoscaling off) on 127.0.0.1; its base URL."""
    from ray import serve

    from tina.serve import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"checkpoint": str(tiny_run / "generator"), "autoscaling": False}),
                  name="tina-web", route_prefix="/")
        yield f"http://127.0.0.1:{port}/"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    """Headless Debian chromium with a fresh profile (no Playwright-managed browser); each test
    opens its own page."""
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} missing: apt-get install -y chromium"
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium_profile"), executable_path=CHROMIUM,
            headless=True, args=CHROMIUM_FLAGS,
            accept_downloads=True)
        try:
            yield ctx
        finally:
            ctx.close()


def _post(url: str, body: dict) -> tuple[int, bytes]:
    req = urllib.request.Request(url, json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _test_pngs(tmp_path: Path, class_name: str, n: int = 1) -> list[Path]:
    """The first `n` real test-split images of `class_name`, written as PNG files."""
    from tina.data import load_split

    test = load_split("fashion-mnist+mnist", "test")
    paths = []
    for j, i in enumerate(test.class_indices(test.classes.index(class_name))[:n].tolist()):
        paths.append(tmp_path / f"{class_name.replace(' ', '_')}_{j}.png")
        Image.fromarray(test.images[i, 0].numpy(), mode="L").save(paths[-1])
    return paths


@pytest.fixture()
def page(endpoint: str, browser: BrowserContext) -> Iterator[Page]:
    """The page at `/`, once it has read /v1/info and /readyz answered."""
    page = browser.new_page()
    try:
        page.goto(endpoint)
        expect(page.locator("#status")).to_have_attribute("data-ready", "true", timeout=30_000)
        yield page
    finally:
        page.close()


def test_page_generates_a_model_and_shows_the_label_classify_returns(
        endpoint: str, page: Page, tmp_path: Path) -> None:
    with urllib.request.urlopen(endpoint + "v1/info", timeout=30) as r:
        api_info = json.load(r)
    expect(page.locator("#status")).to_contain_text(f"K_max {api_info['k_max']}")
    expect(page.locator("#preprocessing-steps li")).to_have_text(api_info["input_preprocessing"])
    page.get_by_role("button", name="Add class").click()
    for i, name in enumerate(PROMPT):
        page.get_by_label(f"Class {i + 1} name").fill(name.lower())  # canonical names come back
    page.locator("#seed").fill("3")
    page.get_by_role("button", name="Get model").click()
    expect(page.locator("#model")).to_be_visible(timeout=30_000)

    status, raw = _post(endpoint + "v1/models",
                        {"classes": [n.lower() for n in PROMPT], "seed": 3, "format": "json"})
    assert status == 200, raw
    info = json.loads(raw)
    assert info["classes"] == PROMPT
    assert page.locator("#model-classes li").all_inner_texts() == PROMPT
    expect(page.locator("#model-id")).to_have_text(info["model_id"])
    expect(page.locator("#model-params")).to_have_text(f"{info['n_params']:,}")

    with page.expect_download() as dl:
        page.get_by_role("link", name="Download model.safetensors").click()
    downloaded = Path(dl.value.path()).read_bytes()
    status, served = _post(endpoint + "v1/models", {"classes": PROMPT, "seed": 3})
    assert status == 200
    got, want = load_safetensors(downloaded), load_safetensors(served)
    assert got.keys() == want.keys() and got["fc.weight"].shape[0] == len(PROMPT)
    assert all(torch.equal(got[k], want[k]) for k in want)

    png = _test_pngs(tmp_path, "Sneaker")[0]
    page.locator("#test-image").set_input_files(png)
    page.get_by_role("button", name="Classify").click()
    expect(page.locator("#prediction")).to_be_visible(timeout=30_000)

    status, raw = _post(endpoint + "v1/classify", {
        "classes": [n.lower() for n in PROMPT], "seed": 3,
        "images": [base64.b64encode(png.read_bytes()).decode()]})
    assert status == 200, raw
    want_pred = json.loads(raw)["predictions"][0]
    expect(page.locator("#predicted-label")).to_have_text(want_pred["label"])
    rows = page.locator("#probabilities tbody tr")
    expect(rows).to_have_count(len(PROMPT))
    shown = [float(t.rstrip("%")) for t in rows.locator("td:nth-child(2)").all_inner_texts()]
    assert shown == [round(100 * p, 1) for p in want_pred["probabilities"]]
    expect(page.locator("#error")).to_be_hidden()


def test_page_shows_the_apis_4xx_errors(endpoint: str, page: Page, tmp_path: Path) -> None:
    bad = ["Sneaker", " sneaker"]  # the same class twice
    status, raw = _post(endpoint + "v1/models", {"classes": [n.strip() for n in bad], "seed": 0})
    assert status == 422
    message = json.loads(raw)["error"]["message"]
    assert message.startswith("classes")
    for i, name in enumerate(bad):
        page.get_by_label(f"Class {i + 1} name").fill(name)
    page.get_by_role("button", name="Get model").click()
    error = page.get_by_role("alert")
    expect(error).to_be_visible(timeout=30_000)
    expect(error).to_contain_text(f"422 prompt_error: {message}")
    expect(page.get_by_label("Class 1 name")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#model")).to_be_hidden()

    # a valid prompt clears the error; a file that is no image gets the API's 422 for images[0]
    page.get_by_label("Class 2 name").fill("Bag")
    page.get_by_role("button", name="Get model").click()
    expect(page.locator("#model")).to_be_visible(timeout=30_000)
    expect(error).to_be_hidden()
    fake = tmp_path / "not_an_image.png"
    fake.write_bytes(b"this is text, not a PNG")
    page.locator("#test-image").set_input_files(fake)
    page.get_by_role("button", name="Classify").click()
    expect(error).to_contain_text("422 invalid_image: images[0]: not a readable PNG or JPEG")
    expect(page.locator("#prediction")).to_be_hidden()


def test_page_generates_a_model_from_example_images(endpoint: str, page: Page,
                                                    tmp_path: Path) -> None:
    names = ["my shoes", "my bags"]
    files = [_test_pngs(tmp_path, "Sneaker", 2), _test_pngs(tmp_path, "Bag", 2)]
    for i, (name, paths) in enumerate(zip(names, files, strict=True)):
        page.get_by_label(f"Class {i + 1} name").fill(name)
        page.get_by_label(f"Class {i + 1} example image files").set_input_files(paths)
    expect(page.locator(".class-row .examples").first).to_have_text("2 example image(s)")
    page.get_by_role("button", name="Get model").click()
    expect(page.locator("#model")).to_be_visible(timeout=30_000)

    status, raw = _post(endpoint + "v1/models", {"classes": names, "seed": 0, "format": "json",
                                                 "examples": [[base64.b64encode(
                                                     p.read_bytes()).decode() for p in paths]
                                                     for paths in files]})
    assert status == 200, raw
    assert page.locator("#model-classes li").all_inner_texts() == names
    expect(page.locator("#model-id")).to_have_text(json.loads(raw)["model_id"])
