"""The HTTP API of the Tina endpoint: request/response schemas, error bodies, image decoding.

Every client error becomes `ApiError` (status, code, message naming the field and the limit, field)
and reaches the client as the JSON body `{"error": {"code", "message", "field"}, "request_id"}`.
`tina.serve` holds the deployments and routes; this module does not import Ray.

Image input (`decode_image`): base64 PNG or JPEG (a `data:image/...;base64,` prefix is accepted)
-> the model's input, documented in `/v1/info` under "input_preprocessing":
1. decode, refusing files over `max_image_bytes` and images over `max_image_pixels` pixels before
   any pixel is decoded (decompression bombs; PIL's own bomb check is raised as an error too);
2. apply the EXIF orientation; flatten transparency onto white;
3. grayscale (or RGB for a 3-channel checkpoint);
4. pad to a square with the border's median colour, resize to image_size x image_size;
5. polarity: Fashion-MNIST and MNIST show a light object on a dark background, so an image whose
   border is light on average (mean > 127) is inverted;
6. uint8 (C, H, W); the network then applies (x / 255 - 0.5) / 0.5 (tina.data.PREPROCESSING).
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    StringConstraints,
    ValidationError,
)

from tina.backbones import build_model
from tina.config import ServeConfig
from tina.data import to_float
from tina.errors import PromptError
from tina.tasks import MAX_NAME_CHARS, validate_prompt

INPUT_PREPROCESSING = [
    "base64 PNG or JPEG (an optional data:image/...;base64, prefix)",
    "EXIF orientation applied; transparency flattened onto white",
    "grayscale for 1-channel checkpoints (RGB for 3-channel ones)",
    "padded to a square with the border's median colour, resized to image_size x image_size",
    "inverted when the border is light (mean > 127): the models expect a light object on a "
    "dark background",
    "uint8 -> (x / 255 - 0.5) / 0.5",
]


class ApiError(Exception):
    """A client or server fault with its HTTP status; `message` names the field and the limit."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers or {}


def error_body(code: str, message: str, field: str | None, request_id: str) -> dict[str, Any]:
    """The JSON body of every error response."""
    return {"error": {"code": code, "message": message, "field": field}, "request_id": request_id}


# ---------------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------------

Name = Annotated[StrictStr, StringConstraints(max_length=MAX_NAME_CHARS)]
B64Image = Annotated[StrictStr, Field(description="base64 PNG or JPEG")]


class PromptFields(BaseModel):
    """A prompt (class names or descriptions, or example images per class) and sampler settings."""

    model_config = ConfigDict(extra="forbid")

    classes: list[Name] | None = Field(
        None, max_length=1000, description="class names or natural-language descriptions, in "
        "output order (1 to K_max); with `examples`, optional labels for the image classes")
    examples: list[list[B64Image]] | None = Field(
        None, max_length=1000, description="an image prompt: one or more example images per "
        "class, in output order")
    seed: StrictInt = Field(0, ge=0, le=2**63 - 1, description="sampling seed")
    sampler: Literal["ddim", "ddpm"] | None = Field(None, description="default: checkpoint's")
    steps: StrictInt | None = Field(None, ge=1, description="DDIM steps; default: checkpoint's")
    guidance: float | None = Field(None, ge=0, allow_inf_nan=False,
                                   description="classifier-free guidance scale (1 = none)")


class ModelRequest(PromptFields):
    """POST /v1/models."""

    format: Literal["safetensors", "json"] = Field(
        "safetensors", description="safetensors bytes, or JSON with the classes and a model id")


class ClassifyRequest(PromptFields):
    """POST /v1/classify."""

    images: list[B64Image] = Field(min_length=1, max_length=10_000,
                                   description="base64 PNG or JPEG images to classify")


class ModelInfo(BaseModel):
    """The JSON answer of POST /v1/models with "format": "json"."""

    model_id: str
    classes: list[str]
    arch: str
    n_params: int
    checkpoint_id: str
    seed: int
    sampler: str
    steps: int
    guidance: float
    cache_hit: bool


class Prediction(BaseModel):
    label: str
    index: int
    probabilities: list[float]


class ClassifyResponse(BaseModel):
    model_id: str
    classes: list[str]
    predictions: list[Prediction]


# ---------------------------------------------------------------------------------------------
# Validation beyond the schema (limits that depend on the checkpoint and the ServeConfig)
# ---------------------------------------------------------------------------------------------

def check_prompt(req: PromptFields, k_max: int, cfg: ServeConfig) -> None:
    """Raise ApiError(422) for an empty, too long or duplicate prompt or too many examples."""
    if req.examples is None:
        if not req.classes:
            raise ApiError(422, "prompt_error", "classes: the prompt is empty; give 1 to "
                           f"K_max {k_max} class names (or `examples`)", "classes")
        _check_names(req.classes, k_max)
        return
    k = len(req.examples)
    if k == 0:
        raise ApiError(422, "prompt_error", "examples: the prompt is empty; give one list of "
                       f"images per class, 1 to K_max {k_max} classes", "examples")
    if k > k_max:
        raise ApiError(422, "prompt_error", f"examples: {k} classes > K_max {k_max}", "examples")
    for i, imgs in enumerate(req.examples):
        if not imgs:
            raise ApiError(422, "prompt_error", f"examples[{i}]: no images; give at least 1",
                           f"examples[{i}]")
        if len(imgs) > cfg.max_examples_per_class:
            raise ApiError(422, "too_many_images", f"examples[{i}]: {len(imgs)} images > "
                           f"max_examples_per_class {cfg.max_examples_per_class}",
                           f"examples[{i}]")
    if req.classes is not None:
        if len(req.classes) != k:
            raise ApiError(422, "prompt_error", f"classes: {len(req.classes)} labels for "
                           f"{k} example classes; give one label per class or none", "classes")
        _check_names(req.classes, k_max)


def _check_names(names: list[str], k_max: int) -> None:
    try:
        validate_prompt(names, k_max)
    except PromptError as e:
        msg = str(e)
        raise ApiError(422, "prompt_error", msg if msg.startswith("classes:") else
                       f"classes: {msg}", "classes") from None


def check_images_count(images: list[str], cfg: ServeConfig) -> None:
    """Raise ApiError(422) when a classify request holds more than max_images images."""
    if len(images) > cfg.max_images:
        raise ApiError(422, "too_many_images",
                       f"images: {len(images)} > max_images {cfg.max_images}", "images")


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

@dataclass
class ImageSpec:
    """What the checkpoint's models take: (channels, image_size, image_size) uint8."""

    channels: int
    size: int


def decode_image(b64: str, field: str, spec: ImageSpec, cfg: ServeConfig) -> torch.Tensor:
    """base64 PNG/JPEG -> (C, size, size) uint8 following the module docstring's steps.

    Raises:
        ApiError: 422 invalid base64 or image bytes / not PNG or JPEG; 413 a file over
            max_image_bytes or an image over max_image_pixels (decompression bomb).
    """
    if b64.startswith("data:"):
        b64 = b64.split(",", 1)[-1]
    if len(b64) > (cfg.max_image_bytes + 2) // 3 * 4 + 4:  # refuse before decoding
        raise ApiError(413, "image_too_large", f"{field}: ~{len(b64) * 3 // 4} bytes > "
                       f"max_image_bytes {cfg.max_image_bytes}", field)
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_base64", f"{field}: not valid base64", field) from None
    if len(raw) > cfg.max_image_bytes:
        raise ApiError(413, "image_too_large", f"{field}: {len(raw)} bytes > max_image_bytes "
                       f"{cfg.max_image_bytes}", field)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(raw), formats=["PNG", "JPEG"])
            w, h = img.size
            if w * h > cfg.max_image_pixels:
                raise ApiError(413, "image_too_large", f"{field}: {w}x{h} = {w * h} pixels > "
                               f"max_image_pixels {cfg.max_image_pixels}", field)
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ApiError(413, "image_too_large", f"{field}: decompression bomb ({e})",
                           field) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ApiError(422, "invalid_image", f"{field}: not a readable PNG or JPEG image "
                           f"({type(e).__name__})", field) from None
    return _to_input(img, spec)


def decode_images(images: list[str], field: str, spec: ImageSpec,
                  cfg: ServeConfig) -> torch.Tensor:
    """base64 images -> (N, C, size, size) uint8 (see `decode_image`)."""
    return torch.stack([decode_image(b, f"{field}[{i}]", spec, cfg)
                        for i, b in enumerate(images)])


def decode_examples(examples: list[list[str]], spec: ImageSpec,
                    cfg: ServeConfig) -> list[torch.Tensor]:
    """An image prompt (K lists of base64 images) -> K tensors (n_k, C, size, size) uint8."""
    return [decode_images(imgs, f"examples[{k}]", spec, cfg) for k, imgs in enumerate(examples)]


def _to_input(img: Image.Image, spec: ImageSpec) -> torch.Tensor:
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    img = img.convert("L" if spec.channels == 1 else "RGB")
    border = _border(img)
    fill = tuple(int(v) for v in border.median(dim=0).values)
    img = ImageOps.pad(img, (spec.size, spec.size), method=Image.Resampling.BILINEAR,
                       color=fill[0] if spec.channels == 1 else fill)
    if float(border.float().mean()) > 127:
        img = ImageOps.invert(img)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return x.view(spec.size, spec.size, spec.channels).permute(2, 0, 1).contiguous()


def _border(img: Image.Image) -> torch.Tensor:
    """(n, C) uint8 pixels of the image's outermost rows and columns."""
    w, h = img.size
    c = len(img.getbands())
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, c)
    return torch.cat([x[0], x[-1], x[:, 0], x[:, -1]])


# ---------------------------------------------------------------------------------------------
# Request bodies and pydantic errors
# ---------------------------------------------------------------------------------------------

def _field(loc: tuple) -> str:
    """("body", "classes", 3) -> "classes[3]"."""
    out = ""
    for part in loc:
        if part == "body":
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def validation_error(e: ValidationError | RequestValidationError) -> ApiError:
    """pydantic's first error -> ApiError naming the field and the limit."""
    err = e.errors()[0]
    field = _field(tuple(err.get("loc", ())))
    if err["type"] == "json_invalid":
        return ApiError(400, "invalid_json", f"body: not valid JSON "
                        f"({err.get('ctx', {}).get('error', err['msg'])})", "body")
    if err["type"] == "extra_forbidden":
        return ApiError(422, "unknown_field", f"{field}: unknown field; see /docs for the "
                        "request schema", field)
    return ApiError(422, "invalid_value", f"{field}: {err['msg']}", field)


async def read_json(request: Request, schema: type[BaseModel], limit: int) -> Any:
    """The body parsed into `schema`, refused past `limit` bytes by Content-Length and by the
    bytes actually read. Raises ApiError 413 / 400 / 422."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"body: Content-Length {declared} > "
                       f"max_body_bytes {limit}", "body")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "body_too_large", f"body: more than max_body_bytes {limit} "
                           "bytes", "body")
    try:
        return schema.model_validate_json(bytes(body))
    except ValidationError as e:
        raise validation_error(e) from None


def body_doc(schema: type[BaseModel]) -> dict:
    """OpenAPI requestBody for a route that reads its body itself (to bound its size)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema.model_json_schema()}}}}


# ---------------------------------------------------------------------------------------------
# Generated models
# ---------------------------------------------------------------------------------------------

def model_card(out: dict[str, Any], preprocessing: dict) -> dict[str, Any]:
    """The generated model's metadata (as `tina generate` writes model.json)."""
    model = _module(out)
    return {"format": "tina-model/1", "arch": out["arch"], "classes": out["classes"],
            "convs": [{"in": m.in_channels, "out": m.out_channels, "stride": m.stride[0]}
                      for m in model.body if hasattr(m, "stride")],
            "n_params": sum(p.numel() for p in model.parameters()),
            "preprocessing": preprocessing, "model_id": out["model_id"],
            "generator_id": out["checkpoint_id"], "seed": out["seed"],
            "sampler": out["sampler"], "steps": out["steps"], "guidance": out["guidance"]}


def _module(out: dict[str, Any]) -> torch.nn.Module:
    model = build_model(out["arch"], out["in_channels"], len(out["classes"]))
    model.load_state_dict(out["state"])
    return model.eval()


@torch.no_grad()
def classify_images(out: dict[str, Any], images: torch.Tensor) -> torch.Tensor:
    """Generated model `out` on images (N, C, H, W) uint8 -> (N, K) float32 probabilities."""
    return torch.softmax(_module(out)(to_float(images)), dim=1)
