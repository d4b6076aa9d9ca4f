"""The Ray Serve endpoint (tina.serve), over real HTTP on loopback, on the session's Ray cluster.

One deployment serves a copy of the tiny pipeline run's real checkpoint (MiniLM encoder, DeViSE
image encoder) for every test here; it is shut down at the end of the module. Error cases each
check the status, the JSON body (code, message naming the field and the limit, field, request id)
and that the service still answers afterwards.
"""

import base64
import io
import json
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from tina.client import ServerError, TinaClient, read_metadata

CFG = {  # small limits so that each error case costs a few kilobytes
    "autoscaling": True, "min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5,
    "max_batch_size": 8,
    "batch_wait_timeout_s": 0.3, "max_queued_requests": 8, "max_body_bytes": 400_000,
    "max_images": 4, "max_examples_per_class": 3, "max_image_bytes": 100_000,
    "max_image_pixels": 1_000_000, "request_timeout_s": 60, "ingress_num_cpus": 0.1,
}
SEEN = ["Sneaker", "Bag", "digit 1"]  # classes of the demo label space


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_b64(image: torch.Tensor) -> str:
    """(1, H, W) or (H, W) uint8 -> base64 PNG."""
    buf = io.BytesIO()
    Image.fromarray(image.squeeze(0).numpy()).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def run_dir(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny run's generator and image encoder (a test removes a file)."""
    out = tmp_path_factory.mktemp("serve_run")
    for name in ("generator", "image_encoder"):
        shutil.copytree(tiny_run / name, out / name)
    return out


@pytest.fixture(scope="module")
def url(ray_cluster: dict, run_dir: Path):
    from ray import serve

    from tina.serve import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({**CFG, "checkpoint": str(run_dir / "generator")}), route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        assert requests.get(base + "/readyz", timeout=30).status_code == 200
        yield base
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def test_images() -> torch.Tensor:
    """16 real test images (N, 1, 28, 28) uint8 of the demo label space."""
    from tina.data import load_split

    return load_split("fashion-mnist+mnist", "test").images[:16]


def post(url: str, path: str, body, **kw) -> requests.Response:
    return requests.post(url + path, json=body, timeout=60, **kw)


def assert_error(r: requests.Response, status: int, code: str, *needles: str,
                 field: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code, body
    for n in needles:
        assert n in body["error"]["message"], body
    if field is not None:
        assert body["error"]["field"] == field, body
    assert body["request_id"] == r.headers["x-request-id"]
    return body


def assert_serving(url: str) -> None:
    """The service still generates (a cached prompt: cheap) after an error."""
    r = post(url, "/v1/models", {"classes": SEEN, "format": "json"})
    assert r.status_code == 200, r.text
    assert r.json()["classes"] == SEEN


# ---------------------------------------------------------------------------------------------
# Happy paths
# ---------------------------------------------------------------------------------------------

def test_health_ready_info(url: str, run_dir: Path) -> None:
    from tina.pipeline import sha256_file

    assert requests.get(url + "/healthz").json() == {"status": "ok"}
    assert requests.get(url + "/readyz").status_code == 200
    info = requests.get(url + "/v1/info").json()
    meta = json.loads((run_dir / "generator" / "tina.json").read_text())
    assert info["checkpoint_id"] == sha256_file(run_dir / "generator" / "tina.safetensors")
    assert info["k_max"] == 10 and info["label_space"]["classes"] == meta["label_space"]["classes"]
    assert info["encoder"]["name"] == "minilm"
    assert info["defaults"]["sampler"] == meta["sample"]["sampler"]
    assert info["defaults"]["steps"] == meta["sample"]["steps"]
    assert "Shirt" in info["label_space"]["held_out"] and "Shirt" not in info["label_space"]["seen"]
    assert requests.get(url + "/openapi.json").json()["paths"]["/v1/models"]["post"]


def test_model_bytes_metadata_and_headers(url: str) -> None:
    r = post(url, "/v1/models", {"classes": ["sneaker", " BAG ", "a zebra with stripes"],
                                 "seed": 3})
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    meta = read_metadata(r.content)
    # known names come back as the dataset spells them; free text is kept (generated from text)
    assert meta["classes"] == ["Sneaker", "Bag", "a zebra with stripes"]
    assert json.loads(r.headers["x-tina-classes"]) == meta["classes"]
    assert r.headers["x-tina-arch"] == meta["arch"] == "cnn-400"
    assert json.loads(r.headers["x-tina-preprocessing"])["image_size"] == 28
    assert meta["preprocessing"]["channels"] == 1 and meta["seed"] == 3
    state = load_safetensors(r.content)
    assert state["fc.weight"].shape == (3, meta["convs"][-1]["out"])
    assert state["fc.bias"].shape == (3,)
    again = post(url, "/v1/models", {"classes": ["Sneaker", "bag", "a zebra with stripes"],
                                     "seed": 3})
    assert again.headers["x-tina-cache"] == "hit" and read_metadata(again.content) == meta
    assert all(torch.equal(v, state[k]) for k, v in load_safetensors(again.content).items())


def test_unicode_names_travel_in_headers_and_metadata(url: str) -> None:
    r = post(url, "/v1/models", {"classes": ["robe d'été", "chaussure \U0001f45f"]})
    assert r.status_code == 200, r.text
    assert json.loads(r.headers["x-tina-classes"]) == ["robe d'été", "chaussure \U0001f45f"]
    assert read_metadata(r.content)["classes"] == ["robe d'été", "chaussure \U0001f45f"]


def test_json_format_and_seed(url: str) -> None:
    a = post(url, "/v1/models", {"classes": SEEN, "seed": 1, "format": "json"}).json()
    b = post(url, "/v1/models", {"classes": SEEN, "seed": 2, "format": "json"}).json()
    assert a["classes"] == SEEN and a["model_id"] != b["model_id"]
    assert a["n_params"] > 0 and a["sampler"] == "ddim"


def _plain_torch_model(content: bytes) -> tuple[torch.nn.Module, list[str]]:
    """The README's recipe: the model from its safetensors file with PyTorch alone."""
    meta = read_metadata(content)
    layers = []
    for c in meta["convs"]:
        layers += [torch.nn.Conv2d(c["in"], c["out"], 3, c["stride"], 1, bias=False),
                   torch.nn.ReLU()]
    model = torch.nn.ModuleDict({"body": torch.nn.Sequential(*layers),
                                 "fc": torch.nn.Linear(meta["convs"][-1]["out"],
                                                       len(meta["classes"]))})
    model.load_state_dict(load_safetensors(content))
    return model, meta["classes"]


def test_classify_agrees_with_the_returned_model(url: str, test_images: torch.Tensor) -> None:
    prompt = {"classes": ["T-shirt/top", "Trouser", "digit 0", "digit 1"], "seed": 5}
    model, classes = _plain_torch_model(post(url, "/v1/models", prompt).content)
    x = test_images[:4]
    with torch.no_grad():
        probs = torch.softmax(model["fc"](model["body"]((x.float() / 255 - 0.5) / 0.5)
                                          .mean(dim=(2, 3))), dim=1)
    r = post(url, "/v1/classify", prompt | {"images": [png_b64(i) for i in x]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["classes"] == classes and len(out["predictions"]) == 4
    got = torch.tensor([p["probabilities"] for p in out["predictions"]])
    assert torch.allclose(got, probs, atol=1e-5)
    assert [p["label"] for p in out["predictions"]] == [classes[i] for i in probs.argmax(1)]
    # a dark object on a light background (a photo, a scan) is inverted to the models' polarity
    inv = post(url, "/v1/classify", prompt | {"images": [png_b64(255 - i) for i in x]}).json()
    assert torch.allclose(torch.tensor([p["probabilities"] for p in inv["predictions"]]), probs,
                          atol=1e-5)
    # a bigger RGB JPEG goes through grayscale + resize to 28 x 28
    buf = io.BytesIO()
    Image.fromarray(x[0, 0].numpy()).resize((112, 112)).convert("RGB").save(buf, "JPEG")
    r = post(url, "/v1/classify", prompt | {"images": [base64.b64encode(buf.getvalue()).decode()]})
    assert r.status_code == 200 and len(r.json()["predictions"][0]["probabilities"]) == 4


def test_image_prompt(url: str, test_images: torch.Tensor) -> None:
    ex = [[png_b64(test_images[0]), png_b64(test_images[1])], [png_b64(test_images[2])]]
    r = post(url, "/v1/models", {"examples": ex, "classes": ["mine", "yours"], "format": "json"})
    assert r.status_code == 200, r.text
    assert r.json()["classes"] == ["mine", "yours"]
    r = post(url, "/v1/models", {"examples": ex})
    assert read_metadata(r.content)["classes"] == ["class 1", "class 2"]


def test_alone_equals_batched(url: str, run_dir: Path) -> None:
    """Concurrent requests share sampler calls, and each model equals the one
    tina.generate makes for that prompt alone (float rounding of batched matmuls aside)."""
    from tina.generate import load_generator

    prompts = [(["Coat", "digit 2"], 11), (["Trouser", "Dress", "digit 5"], 12),
               (["Bag", "digit 9"], 13), (["Pullover", "Ankle boot"], 14),
               (["digit 0", "digit 6", "Sneaker", "Coat"], 15), (["Dress", "Bag"], 16)]
    before = requests.get(url + "/v1/stats").json()["batch_sizes"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        served = list(pool.map(lambda p: post(url, "/v1/models",
                                              {"classes": p[0], "seed": p[1]}), prompts))
    after = requests.get(url + "/v1/stats").json()["batch_sizes"]
    new = {int(k): v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    assert max(new) > 1, f"no batching happened: {new}"
    gen = load_generator(run_dir / "generator")
    for (classes, seed), r in zip(prompts, served, strict=True):
        alone = gen.generate([classes], [seed])[0].state_dict()
        got = load_safetensors(r.content)
        assert got.keys() == alone.keys()
        for k, v in alone.items():
            assert torch.allclose(got[k], v, atol=1e-6, rtol=0), (classes, k)  # measured ~1e-8


def test_request_id_echoed_or_generated(url: str) -> None:
    r = requests.get(url + "/healthz", headers={"X-Request-ID": "my-trace-42"})
    assert r.headers["x-request-id"] == "my-trace-42"
    r = post(url, "/v1/models", {"classes": []}, headers={"X-Request-ID": "bad-one-7"})
    assert r.json()["request_id"] == "bad-one-7"
    a, b = requests.get(url + "/healthz"), requests.get(url + "/healthz")
    assert a.headers["x-request-id"] and a.headers["x-request-id"] != b.headers["x-request-id"]
    # the ingress replica's log names the request id with the error it answered
    from ray._private.worker import _global_node

    logs = Path(_global_node.get_logs_dir_path()) / "serve"
    for _ in range(50):  # log lines reach the file within moments
        text = "".join(p.read_text(errors="replace") for p in logs.glob("*Ingress*.log"))
        if "request_id=bad-one-7" in text:
            break
        time.sleep(0.1)
    assert "request_id=bad-one-7 POST /v1/models -> 422 prompt_error" in text


# ---------------------------------------------------------------------------------------------
# Client errors: 4xx JSON naming the field and the limit; the service keeps serving
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "status", "code", "field", "needles"), [
    ({"classes": []}, 422, "prompt_error", "classes", ["classes: the prompt is empty"]),
    ({}, 422, "prompt_error", "classes", ["classes: the prompt is empty"]),
    ({"classes": [f"digit {i}" for i in range(10)] + ["Bag", "Coat"]}, 422, "prompt_error",
     "classes", ["classes: 12 > K_max 10"]),
    ({"classes": ["Sneaker", " sneaker "]}, 422, "prompt_error", "classes",
     ["duplicate class 'sneaker'", "positions 1 and 2"]),
    ({"classes": ["Sneaker", 5]}, 422, "invalid_value", "classes[1]",
     ["classes[1]: Input should be a valid string"]),
    ({"classes": ["Bag", "x" * 201]}, 422, "invalid_value", "classes[1]",
     ["classes[1]:", "at most 200 characters"]),
    ({"classes": ["Bag"], "colour": "red"}, 422, "unknown_field", "colour", ["colour: unknown"]),
    ({"classes": ["Bag"], "steps": 5000}, 422, "prompt_error", "steps",
     ["steps: 5000 is outside [1, 1000]"]),
    ({"classes": ["Bag"], "steps": 0}, 422, "invalid_value", "steps",
     ["steps:", "greater than or equal to 1"]),
    ({"classes": ["Bag"], "guidance": -1}, 422, "invalid_value", "guidance", ["guidance:"]),
    ({"classes": ["Bag"], "seed": 2**70}, 422, "invalid_value", "seed", ["seed:"]),
    ({"classes": ["Bag"], "sampler": "euler"}, 422, "invalid_value", "sampler", ["'ddim'"]),
    ({"classes": "Bag"}, 422, "invalid_value", "classes", ["classes: Input should be a valid"]),
    ({"examples": []}, 422, "prompt_error", "examples", ["examples: the prompt is empty"]),
    ({"examples": [[]]}, 422, "prompt_error", "examples[0]", ["examples[0]: no images"]),
    ({"examples": [["eA=="]] * 11}, 422, "prompt_error", "examples", ["11 classes > K_max 10"]),
    ({"examples": [["eA=="] * 4]}, 422, "too_many_images", "examples[0]",
     ["examples[0]: 4 images > max_examples_per_class 3"]),
    ({"examples": [["eA=="]], "classes": ["a", "b"]}, 422, "prompt_error", "classes",
     ["2 labels for 1 example classes"]),
    ([1, 2], 422, "invalid_value", "body", ["body: Input should be an object"]),
])
def test_prompt_errors(url: str, body, status: int, code: str, field: str,
                       needles: list[str]) -> None:
    assert_error(post(url, "/v1/models", body), status, code, *needles, field=field)
    assert_serving(url)


@pytest.mark.parametrize("path", ["/v1/models", "/v1/classify"])
def test_no_client_body_causes_a_server_error(url: str, path: str) -> None:
    bodies = [b"", b"null", b'"text"', b"3", b"\xff\xfe garbage", b"[" * 5000 + b"]" * 5000,
              b'{"classes": null}', b'{"images": []}', b'{"images": null, "classes": ["Bag"]}',
              b'{"classes": ["Bag"], "images": [12]}', b'{"classes": ["Bag"], "guidance": NaN}',
              b'{"classes": ["Bag"], "seed": 1.5}', b'{"classes": ["Bag"], "seed": "1"}',
              b'{"classes": ["Bag"], "steps": true}', b'{"examples": [["\u00e9"]]}',
              json.dumps({"classes": ["\u00e9t\u00e9 \U0001f600", "Bag"],
                          "images": ["=" * 8]}).encode()]
    for body in bodies:
        r = requests.post(url + path, data=body, timeout=30,
                          headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (body[:60], r.status_code, r.text)
        assert r.json()["error"]["code"] and r.json()["request_id"], r.text
    assert_serving(url)


def test_invalid_json(url: str) -> None:
    r = requests.post(url + "/v1/models", data=b'{"classes": ["Bag",', timeout=30,
                      headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_json", "body: not valid JSON", field="body")
    assert_serving(url)


def test_body_over_limit_by_content_length_and_by_bytes(url: str) -> None:
    big = json.dumps({"classes": ["x" * 500_000]}).encode()
    r = requests.post(url + "/v1/models", data=big, timeout=30)  # Content-Length set
    assert_error(r, 413, "body_too_large", "Content-Length", "> max_body_bytes 400000")
    chunks = (big[i:i + 65536] for i in range(0, len(big), 65536))  # chunked: no length
    r = requests.post(url + "/v1/models", data=chunks, timeout=30)
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "body_too_large", "more than max_body_bytes 400000")
    assert_serving(url)


def _classify(url: str, images: list[str]) -> requests.Response:
    return post(url, "/v1/classify", {"classes": SEEN, "images": images})


def test_image_errors(url: str, test_images: torch.Tensor) -> None:
    ok = png_b64(test_images[0])
    assert_error(_classify(url, [ok] * 5), 422, "too_many_images", "images: 5 > max_images 4",
                 field="images")
    assert_error(_classify(url, [ok, "not base64!"]), 422, "invalid_base64",
                 "images[1]: not valid base64", field="images[1]")
    junk = base64.b64encode(b"GIF89a but not really an image").decode()
    assert_error(_classify(url, [junk]), 422, "invalid_image",
                 "images[0]: not a readable PNG or JPEG", field="images[0]")
    bmp = io.BytesIO()
    Image.new("L", (28, 28)).save(bmp, "BMP")  # a real image, but not PNG/JPEG
    assert_error(_classify(url, [base64.b64encode(bmp.getvalue()).decode()]), 422,
                 "invalid_image", "images[0]")
    noise = io.BytesIO()  # incompressible: ~120 KB > max_image_bytes
    Image.frombytes("L", (350, 350), torch.randint(0, 256, (350 * 350,), dtype=torch.uint8,
                    generator=torch.Generator().manual_seed(0)).numpy().tobytes()).save(noise,
                                                                                      "PNG")
    assert_error(_classify(url, [base64.b64encode(noise.getvalue()).decode()]), 413,
                 "image_too_large", "images[0]:", "> max_image_bytes 100000")
    bomb = io.BytesIO()  # 25 Mpixel, a few KB on the wire: refused before decoding
    Image.new("L", (5000, 5000)).save(bomb, "PNG")
    assert len(bomb.getvalue()) < 100_000
    assert_error(_classify(url, [base64.b64encode(bomb.getvalue()).decode()]), 413,
                 "image_too_large", "images[0]: 5000x5000 = 25000000 pixels > max_image_pixels "
                 "1000000")
    assert_error(post(url, "/v1/models", {"examples": [[ok, "%%%"]]}), 422, "invalid_base64",
                 "examples[0][1]: not valid base64")
    assert_serving(url)


def test_decompression_bomb_by_pil_limit(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PIL's own bomb check (MAX_IMAGE_PIXELS) is raised as an error, not a warning."""
    from tina.api import ApiError, ImageSpec, decode_image
    from tina.config import ServeConfig

    buf = io.BytesIO()
    Image.new("L", (800, 800)).save(buf, "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400_000)  # warns above, errors above 2x
    with pytest.raises(ApiError, match="decompression bomb") as e:
        decode_image(base64.b64encode(buf.getvalue()).decode(), "images[0]", ImageSpec(1, 28),
                     ServeConfig(checkpoint="x"))
    assert e.value.status == 413


def test_not_found_and_method(url: str) -> None:
    assert_error(requests.get(url + "/v2/nothing"), 404, "not_found", "/v2/nothing")
    assert_error(requests.get(url + "/v1/models"), 405, "method_not_allowed", "/v1/models")
    assert_serving(url)


# ---------------------------------------------------------------------------------------------
# Server faults: 5xx JSON
# ---------------------------------------------------------------------------------------------

def test_checkpoint_gone_is_503(url: str, run_dir: Path) -> None:
    weights = run_dir / "generator" / "tina.safetensors"
    moved = weights.with_name("moved.safetensors")
    weights.rename(moved)
    try:
        assert_error(requests.get(url + "/readyz"), 503, "checkpoint_unavailable", "is gone")
        r = post(url, "/v1/models", {"classes": ["Coat"], "seed": 99})
        assert_error(r, 503, "checkpoint_unavailable", "tina.safetensors")
        assert requests.get(url + "/healthz").status_code == 200  # alive, not ready
    finally:
        moved.rename(weights)
    assert requests.get(url + "/readyz").status_code == 200
    assert_serving(url)


def test_overload_is_503_with_retry_after(url: str) -> None:
    """More concurrent requests than max_ongoing_requests (16) + max_queued_requests (8):
    the rest are refused at once with 503 + Retry-After, and the service recovers."""
    def one(seed: int) -> requests.Response:
        return post(url, "/v1/models", {"classes": ["Coat", "Bag"], "seed": 1000 + seed,
                                        "steps": 400, "format": "json"})

    with ThreadPoolExecutor(48) as pool:
        rs = list(pool.map(one, range(48)))
    codes = sorted(r.status_code for r in rs)
    assert set(codes) == {200, 503}, codes
    over = [r for r in rs if r.status_code == 503]
    for r in over:
        assert_error(r, 503, "overloaded", "max_queued_requests 8")
        assert r.headers["retry-after"] == "1"
    assert sum(r.status_code == 200 for r in rs) >= 8  # at least a full batch
    assert_serving(url)


# ---------------------------------------------------------------------------------------------
# Client and CLI
# ---------------------------------------------------------------------------------------------

def test_client(url: str, tmp_path: Path, test_images: torch.Tensor) -> None:
    client = TinaClient(url)
    assert client.ready() and client.info()["k_max"] == 10
    model = client.generate(SEEN, seed=4)
    assert model.classes == SEEN
    net = model.to_module()
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 3)
    path = model.save(tmp_path / "m" / "model.safetensors")
    assert json.loads(path.with_suffix(".json").read_text())["model_id"] == model.model_id
    img = tmp_path / "img.png"
    Image.fromarray(test_images[3, 0].numpy()).save(img)
    res = client.classify([img, img.read_bytes()], classes=SEEN, seed=4)
    assert res["model_id"] == model.model_id and len(res["predictions"]) == 2
    with pytest.raises(ServerError, match="classes: 11 > K_max 10") as e:
        client.generate([f"class {i}" for i in range(11)])
    assert e.value.status == 422 and e.value.field == "classes" and e.value.request_id
    assert not TinaClient(f"http://127.0.0.1:{_free_port()}", timeout_s=5).ready()


def test_tina_request_cli(url: str, tmp_path: Path, test_images: torch.Tensor,
                          capsys: pytest.CaptureFixture) -> None:
    from tina.cli import main

    out = tmp_path / "model.safetensors"
    assert main(["request", "--url", url, "--classes", "Sneaker, Bag,digit 1", "--seed", "4",
                 "--out", str(out)]) == 0
    assert read_metadata(out.read_bytes())["classes"] == SEEN
    assert json.loads(out.with_suffix(".json").read_text())["classes"] == SEEN
    img = tmp_path / "x.png"
    Image.fromarray(test_images[5, 0].numpy()).save(img)
    capsys.readouterr()
    assert main(["request", "--url", url, "--classes", "Sneaker,Bag,digit 1", "--classify",
                 str(img)]) == 0
    label = capsys.readouterr().out.split(": ")[1].split(" (")[0]
    assert label in SEEN
    assert main(["request", "--url", url, "--classes", ",".join(f"c{i}" for i in range(11))]) == 2
    assert "classes: 11 > K_max 10" in capsys.readouterr().err
    assert main(["request", "--url", f"http://127.0.0.1:{_free_port()}", "--classes", "Bag"]) == 2
    assert "cannot reach" in capsys.readouterr().err
    assert main(["request", "--url", url, "--classes", "Bag", "--classify", "nope.png"]) == 2


def test_serve_config_from_command_line_strings(tmp_path: Path) -> None:
    """`serve run tina.serve:build_app key=value` passes strings; they are typed, and checked."""
    from tina.config import serve_config_from_args
    from tina.errors import CheckpointError, ConfigError
    from tina.serve import build_app

    cfg = serve_config_from_args({"checkpoint": "run/generator", "max_batch_size": "4",
                                  "autoscaling": "false", "num_cpus": "0.25",
                                  "image_encoder": "123"})
    assert (cfg.max_batch_size, cfg.autoscaling, cfg.num_cpus) == (4, False, 0.25)
    assert cfg.image_encoder == "123" and cfg.replica_max_ongoing() == 8
    with pytest.raises(ConfigError, match="max_batch_size"):
        serve_config_from_args({"checkpoint": "x", "max_batch_size": "8",
                                "max_ongoing_requests": "4"})
    with pytest.raises(ConfigError, match="checkpoint: required"):
        serve_config_from_args({})
    with pytest.raises(CheckpointError, match="no tina.json"):
        build_app({"checkpoint": str(tmp_path)})


def test_tina_serve_rejects_bad_arguments_before_starting(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from tina.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "no tina.json" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path), "--set", "max_batch_size=two"]) == 2
    assert "max_batch_size" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path), "--set", "colour=1"]) == 2
    assert "colour: unknown key" in capsys.readouterr().err
