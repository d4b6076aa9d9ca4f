"""A small Python client of the Tina endpoint (tina.serve), over `requests`.

    from tina.client import TinaClient
    client = TinaClient("http://127.0.0.1:8000")
    model = client.generate(["sneaker", "bag", "digit 4"], seed=0)
    model.save("my_model/model.safetensors")            # + model.json beside it
    net = model.to_module()                             # a ready nn.Module, output i = class i
    client.classify(["photo.png"], classes=["sneaker", "bag"])["predictions"]
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import torch
from safetensors.torch import load as load_safetensors

from tina.errors import TinaError

ImageLike = str | Path | bytes  # a file path or the file's bytes (PNG or JPEG)


class ServerError(TinaError):
    """The endpoint answered with an error; `status`, `code`, `field`, `request_id` say which."""

    def __init__(self, status: int, code: str, message: str, field: str | None,
                 request_id: str | None) -> None:
        super().__init__(f"HTTP {status} {code}: {message} (request id {request_id})")
        self.status, self.code, self.field, self.request_id = status, code, field, request_id


@dataclass
class GeneratedModel:
    """A generated classifier as the endpoint returned it: safetensors bytes and their metadata."""

    content: bytes  # the safetensors file
    metadata: dict[str, Any]  # classes, arch, convs, preprocessing, model_id, seed, sampler ...

    @property
    def classes(self) -> list[str]:
        return self.metadata["classes"]

    @property
    def model_id(self) -> str:
        return self.metadata["model_id"]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return load_safetensors(self.content)

    def to_module(self) -> torch.nn.Module:
        """The model in eval mode: input (N, C, H, W) float32 in [-1, 1] -> (N, K) logits."""
        from tina.backbones import build_model

        state = self.state_dict()
        model = build_model(self.metadata["arch"], self.metadata["convs"][0]["in"],
                            len(self.classes))
        model.load_state_dict(state)
        return model.eval()

    def save(self, path: str | Path) -> Path:
        """Write the safetensors file to `path` and its metadata to `path` with .json."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.content)
        path.with_suffix(".json").write_text(json.dumps(self.metadata, indent=2))
        return path


def encode_image(image: ImageLike) -> str:
    """A PNG/JPEG file path or bytes -> base64 text for the API."""
    raw = image if isinstance(image, bytes) else Path(image).read_bytes()
    return base64.b64encode(raw).decode()


class TinaClient:
    """Calls the endpoint at `url`. Every method raises ServerError for an error answer and
    TinaError when the server cannot be reached."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout_s: float = 120.0) -> None:
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self.session = requests.Session()

    def _request(self, method: str, path: str, body: dict | None = None) -> requests.Response:
        try:
            r = self.session.request(method, self.url + path, json=body, timeout=self.timeout_s)
        except requests.RequestException as e:
            raise TinaError(f"cannot reach the Tina endpoint at {self.url}: {e}; is "
                            "`tina serve` running there?") from None
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                raise ServerError(r.status_code, err["code"], err["message"], err["field"],
                                  r.json().get("request_id"))
            except (ValueError, KeyError, TypeError):
                raise ServerError(r.status_code, "http_error", r.text[:200], None,
                                  r.headers.get("x-request-id")) from None
        return r

    def info(self) -> dict[str, Any]:
        """GET /v1/info: label space, K_max, encoder, checkpoint id, defaults, limits."""
        return self._request("GET", "/v1/info").json()

    def ready(self) -> bool:
        """True when GET /readyz answers 200."""
        try:
            self._request("GET", "/readyz")
        except TinaError:
            return False
        return True

    @staticmethod
    def _prompt(classes: list[str] | None, examples: list[list[ImageLike]] | None, seed: int,
                sampler: str | None, steps: int | None, guidance: float | None) -> dict:
        body: dict[str, Any] = {"seed": seed}
        if classes is not None:
            body["classes"] = list(classes)
        if examples is not None:
            body["examples"] = [[encode_image(i) for i in imgs] for imgs in examples]
        for k, v in (("sampler", sampler), ("steps", steps), ("guidance", guidance)):
            if v is not None:
                body[k] = v
        return body

    def generate(self, classes: list[str] | None = None,
                 examples: list[list[ImageLike]] | None = None, seed: int = 0,
                 sampler: str | None = None, steps: int | None = None,
                 guidance: float | None = None) -> GeneratedModel:
        """POST /v1/models: class names/descriptions or example images per class -> model."""
        r = self._request("POST", "/v1/models", self._prompt(classes, examples, seed, sampler,
                                                             steps, guidance))
        return GeneratedModel(r.content, read_metadata(r.content))

    def generate_json(self, classes: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        """POST /v1/models with "format": "json": the ordered classes and a model id."""
        body = self._prompt(classes, kwargs.pop("examples", None), kwargs.pop("seed", 0),
                            kwargs.pop("sampler", None), kwargs.pop("steps", None),
                            kwargs.pop("guidance", None))
        return self._request("POST", "/v1/models", body | {"format": "json"}).json()

    def classify(self, images: list[ImageLike], classes: list[str] | None = None,
                 examples: list[list[ImageLike]] | None = None, seed: int = 0,
                 sampler: str | None = None, steps: int | None = None,
                 guidance: float | None = None) -> dict[str, Any]:
        """POST /v1/classify: {"model_id", "classes", "predictions": [{"label", "index",
        "probabilities"}]} for each image, in order."""
        body = self._prompt(classes, examples, seed, sampler, steps, guidance)
        body["images"] = [encode_image(i) for i in images]
        return self._request("POST", "/v1/classify", body).json()


JSON_KEYS = ("classes", "convs", "preprocessing", "n_params", "seed", "steps", "guidance")


def read_metadata(content: bytes) -> dict[str, Any]:
    """The safetensors file's metadata (its header: 8-byte little-endian length + JSON), with
    the values tina.serve stores as JSON decoded."""
    n = int.from_bytes(content[:8], "little")
    raw = json.loads(content[8:8 + n]).get("__metadata__", {})
    return {k: json.loads(v) if k in JSON_KEYS else v for k, v in raw.items()}
