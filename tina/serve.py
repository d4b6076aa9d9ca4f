"""The Ray Serve application: a FastAPI ingress composed with a batching generator deployment.

    tina serve --checkpoint runs/demo/generator                  # local, 127.0.0.1:8000
    serve run tina.serve:build_app checkpoint=runs/demo/generator max_batch_size=16
    serve deploy cluster/serve_config.yaml                       # import_path: tina.serve:build_app

`Ingress` (FastAPI, `@serve.ingress`) validates requests (tina.api), decodes images and classifies;
it awaits `Generator` through a DeploymentHandle. `Generator` replicas hold the checkpoint, gather
concurrent requests into one sampler call with `@serve.batch` (Ray Serve's dynamic batching), keep
an LRU cache of generated models keyed by (checkpoint id, prompt, seed, sampler, steps, guidance)
and scale with `autoscaling_config`. A prompt's noise depends only on (seed, prompt)
(tina.generate.prompt_seed), so a model is the same alone or in any batch (to float rounding).
Settings: tina.config.ServeConfig (the keys of build_app's args).

Routes (OpenAPI page at /docs; request schemas in tina.api):
    POST /v1/models    {"classes": [...]} | {"examples": [[b64, ...], ...]}, optional "seed",
                       "sampler", "steps", "guidance", "format": "safetensors" (default) | "json"
    POST /v1/classify  the same prompt fields + "images": [b64, ...] -> labels, probabilities
    GET  /healthz, /readyz, /v1/info, /v1/stats (one generator replica's batch-size histogram)
Errors: {"error": {"code", "message", "field"}, "request_id"} with a 4xx status for what the
client sent, 503 (+ Retry-After) for overload or a missing checkpoint, 504 after the timeout.
To add routes (e.g. a page at "/"), register them on `app` before the `Ingress` class below:
`@serve.ingress(app)` freezes a copy of the app when the class is defined.
"""


import asyncio
import dataclasses
import json
import logging
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from safetensors.torch import save as save_safetensors
from starlette.exceptions import HTTPException as StarletteHTTPException

from tina.api import (
    INPUT_PREPROCESSING,
    ApiError,
    ClassifyRequest,
    ClassifyResponse,
    ImageSpec,
    ModelInfo,
    ModelRequest,
    PromptFields,
    body_doc,
    check_images_count,
    check_prompt,
    classify_images,
    decode_examples,
    decode_images,
    error_body,
    model_card,
    read_json,
    validation_error,
)
from tina.config import ServeConfig, serve_config_from_args
from tina.errors import CheckpointError
from tina.serve_generator import WEIGHTS, Generator, checkpoint_id
from tina.tasks import MAX_NAME_CHARS
from tina.web import router as web_router

__all__ = ["Generator", "Ingress", "app", "build_app"]

logger = logging.getLogger("ray.serve")


# ---------------------------------------------------------------------------------------------
# Ingress deployment (FastAPI)
# ---------------------------------------------------------------------------------------------

app = FastAPI(title="Tina", version="1",
              description="Text-to-model: send class names (or example images), get a classifier.")
app.include_router(web_router)  # the web page at / (tina.web)


def _request_id(request: Request) -> str:
    """The client's X-Request-ID (Serve's proxy echoes it in the response), else a new one."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = rid
    return rid


def _error(request: Request, status: int, code: str, message: str, field: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    rid = _request_id(request)
    log = logger.warning if status < 500 else logger.error
    log("request_id=%s %s %s -> %d %s: %s", rid, request.method, request.url.path, status, code,
        message)
    return JSONResponse(error_body(code, message, field, rid), status_code=status,
                        headers=headers)


@app.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return _error(request, e.status, e.code, e.message, e.field, e.headers)


@app.exception_handler(RequestValidationError)
async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
    return await _api_error(request, validation_error(e))


@app.exception_handler(StarletteHTTPException)
async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
        e.status_code, "http_error")
    return _error(request, e.status_code, code, f"{request.url.path}: {e.detail}",
                  headers=getattr(e, "headers", None))


@app.exception_handler(Exception)
async def _internal(request: Request, e: Exception) -> JSONResponse:
    logger.exception("request_id=%s unhandled error", _request_id(request))
    return _error(request, 500, "internal", f"internal error ({type(e).__name__}); the request "
                  "id identifies it in the server log")


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """HTTP front: validation, image decoding, classification; generation goes to Generator."""

    def __init__(self, generator: DeploymentHandle, cfg: dict[str, Any]) -> None:
        self.generator, self.cfg = generator, ServeConfig(**cfg)
        self.ckpt = Path(self.cfg.checkpoint)
        self.meta = json.loads((self.ckpt / "tina.json").read_text())
        self.checkpoint_id = checkpoint_id(self.ckpt)
        self.k_max = self.meta["arch"]["k_max"]
        pre = self.meta["preprocessing"]
        self.spec = ImageSpec(pre["channels"], pre["image_size"])

    @app.get("/healthz")
    async def healthz(self) -> dict:
        """The process answers (liveness)."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> dict:
        """Ready once a generator replica has loaded the checkpoint and its file is in place;
        else 503 (checkpoint_unavailable, or not_ready when no replica answers within 5 s)."""
        try:
            await self._call(self.generator.ready.remote(), timeout_s=5.0)
        except ApiError as e:
            if e.code == "timeout":
                raise ApiError(503, "not_ready", "server: no generator replica has loaded the "
                               "checkpoint yet", headers={"Retry-After": "5"}) from None
            raise
        return {"status": "ready", "checkpoint_id": self.checkpoint_id}

    @app.get("/v1/info")
    async def info(self) -> dict:
        """Label space, K_max, encoder, checkpoint id, default sampler, input preprocessing."""
        m, c = self.meta, self.cfg
        space = m["label_space"]
        return {
            "checkpoint_id": self.checkpoint_id, "arch": m["arch"]["name"], "k_max": self.k_max,
            "label_space": {"dataset": space["dataset"], "classes": space["classes"],
                            "held_out": space["held_out"],
                            "seen": [n for n, r in zip(space["classes"], space["has_row"],
                                                       strict=True) if r]},
            "encoder": m["encoder"], "defaults": m["sample"],
            "preprocessing": m["preprocessing"], "input_preprocessing": INPUT_PREPROCESSING,
            "limits": {k: getattr(c, k) for k in (
                "max_body_bytes", "max_images", "max_examples_per_class", "max_image_bytes",
                "max_image_pixels", "request_timeout_s")} | {"max_name_chars": MAX_NAME_CHARS},
        }

    @app.get("/v1/stats")
    async def stats(self) -> dict:
        """One generator replica's batch-size histogram and cache counters (for benchmarks)."""
        return await self._call(self.generator.stats.remote())

    @app.post("/v1/models", openapi_extra=body_doc(ModelRequest),
              responses={200: {"content": {"application/octet-stream": {}},
                               "description": "safetensors bytes, or JSON with format=json"}})
    async def models(self, request: Request) -> Response:
        """Generate a classifier for the prompt: safetensors bytes (classes, arch and
        preprocessing in its metadata and in X-Tina-* headers) or, with "format": "json", the
        ordered classes and a model id."""
        req = await read_json(request, ModelRequest, self.cfg.max_body_bytes)
        out = await self._generate(req)
        card = model_card(out, self.meta["preprocessing"])
        if req.format == "json":
            fields = {k: out[k] for k in ModelInfo.model_fields if k != "n_params"}
            return JSONResponse(ModelInfo(**fields, n_params=card["n_params"]).model_dump())
        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in card.items()}
        headers = {"X-Tina-Model-Id": out["model_id"], "X-Tina-Arch": out["arch"],
                   "X-Tina-Classes": json.dumps(out["classes"]),
                   "X-Tina-Preprocessing": json.dumps(self.meta["preprocessing"]),
                   "X-Tina-Cache": "hit" if out["cache_hit"] else "miss",
                   "Content-Disposition": 'attachment; filename="model.safetensors"'}
        return Response(save_safetensors(out["state"], metadata=meta),
                        media_type="application/octet-stream", headers=headers)

    @app.post("/v1/classify", openapi_extra=body_doc(ClassifyRequest),
              response_model=ClassifyResponse)
    async def classify(self, request: Request) -> dict:
        """Generate (or reuse) the prompt's model and classify the images with it; each image
        goes through the preprocessing that /v1/info lists under input_preprocessing."""
        req = await read_json(request, ClassifyRequest, self.cfg.max_body_bytes)
        check_images_count(req.images, self.cfg)
        x = await asyncio.to_thread(decode_images, req.images, "images", self.spec, self.cfg)
        out = await self._generate(req)
        probs = classify_images(out, x)
        return {"model_id": out["model_id"], "classes": out["classes"], "predictions": [
            {"label": out["classes"][int(p.argmax())], "index": int(p.argmax()),
             "probabilities": [round(float(v), 6) for v in p]} for p in probs]}

    async def _generate(self, req: PromptFields) -> dict[str, Any]:
        check_prompt(req, self.k_max, self.cfg)
        examples = None
        if req.examples is not None:
            examples = await asyncio.to_thread(decode_examples, req.examples, self.spec,
                                               self.cfg)
        prompt = {"classes": req.classes, "examples": examples, "seed": req.seed,
                  "sampler": req.sampler, "steps": req.steps, "guidance": req.guidance}
        return await self._call(self.generator.generate.remote(prompt))

    async def _call(self, response: Any, timeout_s: float | None = None) -> Any:
        """Await a generator call within the request timeout (or `timeout_s`); map its failures
        to ApiError."""
        if not (self.ckpt / WEIGHTS).is_file():
            raise ApiError(503, "checkpoint_unavailable", f"checkpoint: {self.ckpt / WEIGHTS} "
                           "is gone; the operator must restore it or redeploy",
                           headers={"Retry-After": str(self.cfg.retry_after_s * 30)})
        try:
            out = await asyncio.wait_for(response, timeout_s or self.cfg.request_timeout_s)
        except BackPressureError:
            raise ApiError(503, "overloaded", "server: the generator queue is full "
                           f"(max_queued_requests {self.cfg.max_queued_requests}); retry later",
                           headers={"Retry-After": str(self.cfg.retry_after_s)}) from None
        except RayActorError:  # the replica died (e.g. out of memory); Serve starts another
            raise ApiError(503, "generator_unavailable", "server: the generator replica "
                           "stopped; retry shortly",
                           headers={"Retry-After": str(self.cfg.retry_after_s * 5)}) from None
        except TimeoutError:
            raise ApiError(504, "timeout", f"server: no answer within request_timeout_s "
                           f"{timeout_s or self.cfg.request_timeout_s}") from None
        if isinstance(out, dict) and "error" in out:  # a TinaError, returned as a value
            msg, kind = out["error"], out["kind"]
            if kind == "CheckpointError":
                raise ApiError(503, "checkpoint_unavailable", f"checkpoint: {msg}")
            field = msg.split(":", 1)[0] if ":" in msg.split(" ", 1)[0] else None
            raise ApiError(422, "prompt_error", msg, field)
        return out


# ---------------------------------------------------------------------------------------------
# Application builder
# ---------------------------------------------------------------------------------------------

def build_app(args: dict[str, Any]) -> serve.Application:
    """`serve run tina.serve:build_app checkpoint=DIR [key=value ...]`: keys are ServeConfig
    fields. Raises ConfigError (bad keys/values) or CheckpointError (no checkpoint there)."""
    cfg = serve_config_from_args(args)
    ckpt = Path(cfg.checkpoint).expanduser().resolve()
    if not (ckpt / "tina.json").is_file() or not (ckpt / WEIGHTS).is_file():
        raise CheckpointError(f"{ckpt}: no tina.json + {WEIGHTS} here; pass the generator "
                              "directory (e.g. runs/demo/generator)")
    cfg.checkpoint = str(ckpt)
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        "max_ongoing_requests": cfg.replica_max_ongoing(),
        "max_queued_requests": cfg.max_queued_requests}
    if cfg.autoscaling:
        opts["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
            "upscale_delay_s": cfg.upscale_delay_s, "downscale_delay_s": cfg.downscale_delay_s}
    else:
        opts["num_replicas"] = cfg.num_replicas
    d = dataclasses.asdict(cfg)
    generator = Generator.options(**opts).bind(d)
    return Ingress.options(
        num_replicas=cfg.ingress_num_replicas, ray_actor_options={"num_cpus": cfg.ingress_num_cpus},
        max_ongoing_requests=cfg.ingress_max_ongoing_requests).bind(generator, d)
