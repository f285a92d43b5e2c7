r"""The Ray Serve application: an OpenAI-compatible HTTP API over the fdllm engine.

Run it:
    fdllm-serve --model runs/quickstart/tiny-dllm --port 8000         # local Ray, one replica
    serve run serve/config.yaml                                       # the same, from a config
    serve run serve.app:build_app model=/path/to/checkpoint num_replicas=2
    fdllm-serve --model assets/tiny-ar-base --port 8001               # an AR base: requests decode AR

Then:
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
         -d '{"model": "tiny-dllm", "prompt": "Hello", "max_tokens": 16, "temperature": 0}'

Each replica loads the checkpoint once and drives one engine from a background thread, so all of
its in-flight requests are continuously batched together; Serve spreads requests over replicas
and autoscales them on ongoing requests.

Nothing a client sends takes a replica down: every error is an OpenAI-shaped JSON body (framework
404/405/422 included), the API key is checked (in constant time) before the body is read, bodies,
prompts and stop strings have size limits, tokenization and chat templating run on worker threads
(never on the event loop or the engine thread), and a request that fails inside the engine fails
alone; a stream that fails midway ends with an error event and `[DONE]`.
"""

# No `from __future__ import annotations` here: Ray Serve's class-based FastAPI view needs the
# route annotations as real types to find the request body and the Request parameter.
import argparse
import asyncio
import hmac
import json
import logging
import math
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from typing import Any, get_args, get_type_hints

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import TaskCancelledError
from ray.serve.config import RequestRouterConfig
from starlette.exceptions import HTTPException as StarletteHTTPException

from fdllm.engine import GenerationResult, SamplingParams
from fdllm.engine.params import ENGINE_CHOICES, MODES
from fdllm.paths import check_no_shadowing, resolve_local
from fdllm.storage import local_checkpoint
from fdllm.tokenizer import check_text_tokenizer, encode_prompt, token_pieces
from serve.async_engine import (
    AsyncEngine,
    EngineDead,
    EngineOverloaded,
    RequestFailed,
    RequestStream,
    add_all,
    interleave,
)
from serve.detokenize import IncrementalDetokenizer
from serve.metrics import RayMetricsExporter, RequestCounters, make_registry, render
from serve.protocol import (
    NO_CAUSAL_LOGPROBS,
    APIError,
    ChatCompletionRequest,
    Choice,
    CompletionRequest,
    DetokenizeRequest,
    ResponseHead,
    TokenizeRequest,
    chat_chunk,
    chat_logprobs,
    chat_response,
    choice_params,
    completion_chunk,
    completion_logprobs,
    completion_response,
    error_event,
    generation_defaults,
    new_id,
    openapi_body,
    parse_request,
    prompt_chars,
    sse,
    usage_chunk,
)
from serve.request_errors import context_length_exceeded
from serve.routing import DEFAULT_MAX_IMBALANCE, SessionAffinityRouter

log = logging.getLogger("fdllm.serve")

API_KEY_ENV = "FDLLM_API_KEY"
GENERATION_CONFIGS = ("auto", "none")  # ServerConfig.generation_config
FAULT_HEADER = "x-fdllm-inject-fault"  # with ServerConfig.fault_injection: "step" fails the request inside a step
CLIENT_CLOSED = 499  # nginx's status for a request whose client hung up first (counted, and logged at INFO)
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


@dataclass(kw_only=True)
class ServerConfig:
    """What a replica serves and how; the keys of `build_app`'s args and `serve/config.yaml`."""

    model: str  # HF checkpoint dir (with tokenizer) or s3:// / gs:// URI, downloaded once per node (fdllm.storage)
    model_name: str | None = None  # name clients send as "model"; default: the checkpoint dir's name
    api_key: str | None = None  # bearer token required on /v1/*; default: $FDLLM_API_KEY, else open
    device: str = "auto"  # "auto": cuda when the replica has a GPU, else cpu
    dtype: str = "auto"  # "auto": bfloat16 on GPU, float32 on CPU
    threshold: float | None = None  # engine default threshold (None: the checkpoint's fdllm_config)
    use_sub_block_cache: bool | None = None
    # diffusion-mode requests that do not set `block_lookahead` get this (fdllm.SamplingParams.block_lookahead)
    block_lookahead: bool = False
    # The decoding mode of requests that give none ("diffusion", "ar", "speculative"). None: "diffusion" for
    # a block-diffusion checkpoint (one with fdllm_config.json, as the fine-tune exports), "ar" for a plain
    # AR one, which never learned to fill masks (an AR base served beside its fine-tune, a baseline).
    default_mode: str | None = None
    # Tokens a request that gives no max_tokens may generate, at most the rest of the context (as vLLM
    # bounds its default). None (vLLM's and OpenAI's default): the rest of the context, max_model_len -
    # prompt. KV pages are taken as the output grows, so a large
    # default costs nothing up front, except with engine `deterministic` (which reserves every page a
    # request may reach at admission: set a bound there).
    default_max_tokens: int | None = None
    # "auto" (vLLM's default): the checkpoint's generation_config.json gives the defaults of the sampling fields
    # a request does not set (temperature, top_p, top_k, repetition_penalty: Qwen2.5 Instruct's 0.7, 0.8,
    # 20, 1.05); "none": OpenAI's (temperature 1, top_p 1, no top_k or penalty)
    generation_config: str = "auto"
    max_waiting: int = 256  # requests queued inside a replica before it answers 503
    max_body_bytes: int = 8 * 2**20  # larger request bodies get 413 before they are parsed
    # a body not received whole within this many seconds gets 408: Serve's replica reads the body from the proxy as
    # it arrives, so a client trickling it (slowloris) held one of max_ongoing_requests for as long as it liked
    body_timeout_s: float = 60.0  # nginx's client_body_timeout default, here for the whole body (8 MiB: 140 KB/s)
    max_prompt_chars: int = 1_000_000  # longer prompts (all chat messages together) get 400 before tokenizing
    fault_injection: bool = False  # chaos tests only: honour the x-fdllm-inject-fault header
    # fdllm.EngineConfig fields, passed through: gpu_memory_utilization, kv_cache_gib, max_num_seqs,
    # max_model_len, enforce_eager, attention_backend, deterministic, ...
    engine: dict[str, Any] | None = None
    cache_dir: str | None = None  # where a URI model is downloaded on each node (default $FDLLM_CACHE_DIR, ~/.cache/fdllm)
    metrics_interval_s: float = 2.0  # how often replica metrics are pushed to ray.serve.metrics
    # Serve's deployment options. Given here (fdllm-serve's flags, `serve run serve.app:build_app key=value`),
    # or, in a config file, under the application's `deployments:` (serve/config.yaml): Serve applies a change
    # there to the running replicas, while any change of `args` replaces every replica (reloading the model).
    num_replicas: int | None = None  # fixed replica count (default 1); leave unset with autoscaling_config
    autoscaling_config: dict[str, Any] | None = None  # min_replicas, max_replicas, target_ongoing_requests, ...
    num_gpus_per_replica: float = 0.0
    num_cpus_per_replica: float = 1.0
    # Above what a replica runs plus max_waiting, so the replica sheds load itself with an OpenAI-shaped
    # 503; Serve's own backpressure answers (past max_queued_requests) are plain text.
    max_ongoing_requests: int = 512
    max_queued_requests: int = 128
    # A replica being stopped (scale-down, redeploy) waits this long for its in-flight requests, then Serve
    # kills it and cuts the streams still running (the client sees the connection drop). Serve's default,
    # 20 s, is shorter than many a generation.
    graceful_shutdown_timeout_s: float = 300.0
    max_replicas_per_node: int | None = None  # e.g. 1 spreads replicas over nodes
    # Requests with a session id (the HTTP header x-session-id, Ray Serve's; handle.options(session_id=))
    # go to one replica per session, so a chat's turns find the earlier turns in that replica's prefix
    # cache, unless it is full or more than session_max_imbalance requests busier than Serve's own pick
    # (serve.routing). False: Serve's default router for every request.
    session_affinity: bool = False
    session_max_imbalance: int = DEFAULT_MAX_IMBALANCE

    def __post_init__(self) -> None:
        if not self.model.strip():  # "" would resolve to the working directory below
            raise ValueError("model is empty; give a checkpoint directory or an s3:// / gs:// URI")
        # Built where `serve run`/`serve deploy` runs the app builder (its cwd is the app's working_dir
        # copy, or the directory Ray started in); replicas may start elsewhere (fdllm.paths).
        self.model = resolve_local(self.model)
        for name in ("default_max_tokens", "num_replicas", "max_waiting", "max_body_bytes", "max_prompt_chars"):
            value = getattr(self, name)
            if value is not None and value < 1:  # 0 would read as "unset" below
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.api_key == "":  # e.g. --api-key "$UNSET_VARIABLE": serving openly would be a silent surprise
            raise ValueError("api_key is empty; leave it unset to serve without a key")
        if self.generation_config not in GENERATION_CONFIGS:
            raise ValueError(f"generation_config must be one of {GENERATION_CONFIGS}, got {self.generation_config!r}")
        if self.default_mode is not None and self.default_mode not in MODES:
            raise ValueError(f"default_mode must be one of {MODES} or unset, got {self.default_mode!r}")
        from fdllm.loader import parse_dtype, torch_device
        from fdllm.quantization import check_quantization

        # the device a replica has is its own (a GPU node's): only the names are checked here
        if self.device != "auto" and torch_device(self.device).type not in ("cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype != "auto":
            parse_dtype(self.dtype)
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:  # the replica's engine would refuse it
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        # <= 0 or nan: the metrics thread would push without pause; inf: its wait raises and it stops
        if not (math.isfinite(self.body_timeout_s) and self.body_timeout_s > 0):
            raise ValueError(f"body_timeout_s must be a finite number > 0, got {self.body_timeout_s}")
        if not (math.isfinite(self.metrics_interval_s) and self.metrics_interval_s > 0):
            raise ValueError(f"metrics_interval_s must be a finite number > 0, got {self.metrics_interval_s}")
        if self.session_max_imbalance < 0:
            raise ValueError(f"session_max_imbalance must be >= 0, got {self.session_max_imbalance}")
        if self.autoscaling_config is not None and self.num_replicas is not None:
            raise ValueError("give either num_replicas or autoscaling_config, not both")
        if self.autoscaling_config is not None:  # Serve takes a misspelt key ("min_replica") without a word
            from ray.serve.config import AutoscalingConfig

            if unknown := sorted(set(self.autoscaling_config) - set(AutoscalingConfig.model_fields)):
                raise ValueError(f"autoscaling_config: unknown keys {unknown}; Serve's: {sorted(AutoscalingConfig.model_fields)}")
        engine = self.engine_config()  # unknown or invalid engine fields fail here, before any replica starts
        if self.max_ongoing_requests < engine.max_num_seqs:
            log.warning("max_ongoing_requests %d < the engine's max_num_seqs %d: Serve never sends a replica more than "
                        "%d requests at once, so its batch never fills", self.max_ongoing_requests, engine.max_num_seqs,
                        self.max_ongoing_requests)
        if self.device != "auto":  # what the replicas' device cannot run (an "auto" device is the replica's own)
            check_quantization(engine.quantization, torch_device(self.device), self.torch_dtype(self.device))

    def torch_dtype(self, device: str) -> torch.dtype:
        """The replicas' dtype on `device` ("auto": bfloat16 on a GPU, float32 elsewhere)."""
        from fdllm.loader import parse_dtype, torch_device

        if self.dtype != "auto":
            return parse_dtype(self.dtype)
        return torch.bfloat16 if torch_device(device).type == "cuda" else torch.float32

    def engine_config(self):
        """The replica's fdllm.EngineConfig (ValueError on unknown or invalid fields)."""
        import fdllm

        try:
            return fdllm.EngineConfig(**(self.engine or {}))
        except TypeError as exc:  # an unknown keyword
            raise ValueError(f"engine: {exc}") from None

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "ServerConfig":
        """From a Serve config's `args`, or `serve run serve.app:build_app key=value ...`, whose
        values arrive as strings: those are read as their field's type (numbers, booleans, JSON for
        `engine` and `autoscaling_config`, "none")."""
        types = get_type_hints(cls)
        unknown = sorted(set(args) - set(types))
        if unknown:
            raise ValueError(f"unknown serve options {unknown}; known: {sorted(types)}")
        typed = {k: _from_string(k, v, types[k]) if isinstance(v, str) else v for k, v in args.items()}
        return cls(**{k: v for k, v in typed.items() if v is not None})


def _from_string(name: str, value: str, annotation: Any) -> Any:
    """A `key=value` string as the field's type (ValueError naming the field when it is none of them)."""
    kinds = [t for t in get_args(annotation) or (annotation,) if t is not type(None)]
    if str in kinds:
        return value
    if value.strip().lower() in ("none", "null") and len(kinds) < len(get_args(annotation)):
        return None
    for kind in kinds:
        try:
            if kind is bool:
                return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[value.strip().lower()]
            if kind in (int, float):
                return kind(value)
            parsed = json.loads(value)  # dict[str, Any]
            if isinstance(parsed, dict):
                return parsed
        except (KeyError, ValueError):
            continue
    kind = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
    raise ValueError(f"serve option {name}={value!r} is not a valid {kind}")


def default_model_name(model: str) -> str:
    """The name clients send: the checkpoint's directory name, or its run's for a fine-tune's
    `RUN/servable` export."""
    parts = [p for p in model.rstrip("/").split("/") if p]
    return parts[-2] if parts[-1] == "servable" and len(parts) > 1 else parts[-1]


def _json_error(err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


# Docs are routes of the deployment below, so they follow the API key like /v1/*.
api = FastAPI(title="fdllm", description="OpenAI-compatible block-diffusion LLM server",
              docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(APIError)
async def _api_error(_: Request, err: APIError) -> JSONResponse:
    return _json_error(err)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    return _json_error(APIError.from_validation(list(err.errors())))


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    """Framework errors (unknown path, wrong method) in the same shape as ours."""
    error_type = "invalid_request_error" if err.status_code < 500 else "server_error"
    return _json_error(APIError(err.status_code, str(err.detail), type=error_type, code=_HTTP_CODES.get(err.status_code)),
                       headers=getattr(err, "headers", None))


@api.exception_handler(Exception)
async def _unexpected_error(request: Request, err: Exception) -> JSONResponse:
    if isinstance(err, TaskCancelledError):  # Ray Serve's receive() once the client hung up: not an error
        log.info("client disconnected during %s %s", request.method, request.url.path)
        return _json_error(APIError(CLIENT_CLOSED, "client closed the request", code="client_closed_request"))
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=err)
    return _json_error(APIError(500, f"internal server error ({type(err).__name__})", type="server_error"))


def log_through_serve() -> None:
    """In a replica, the engine's (`fdllm.*`) and this app's (`serve.*`) log lines go where Serve's own go:
    the replica's log file and, through Ray, the driver's console, with Serve's request context and level.
    Only "ray.serve" has handlers there: other loggers' INFO lines went nowhere (Python's last resort
    prints WARNING and up, without time or replica)."""
    serve_logger = logging.getLogger("ray.serve")
    for name in ("fdllm", "serve"):
        logger = logging.getLogger(name)
        logger.handlers[:] = serve_logger.handlers
        logger.setLevel(serve_logger.level)
        logger.propagate = False


class EventStream(StreamingResponse):
    """A stream whose client hangs up ends quietly, as starlette ends one on `http.disconnect`: under Ray
    Serve the disconnect is `receive()` raising TaskCancelledError, which starlette's listener let escape
    (an ERROR "Request failed." traceback for every such client, and a 200 in the access log). Closing the
    stream's generator aborts its requests (`_sse`)."""

    async def listen_for_disconnect(self, receive) -> None:
        try:
            await super().listen_for_disconnect(receive)
        except TaskCancelledError:
            log.info("client disconnected during a stream")


def _in_vocabulary(ids: list[int], vocab_size: int, param: str) -> list[int]:
    """`ids`, or a 400 naming `param` when one is outside the vocabulary: the tokenizer raises OverflowError
    (a 500) on an id past 32 bits or below 0, and a completion's echo decodes its token-id prompts before
    the engine's admission would refuse them."""
    if any(not 0 <= t < vocab_size for t in ids):
        raise APIError(400, f"token ids must be in [0, {vocab_size})", param=param)
    return ids


def _field_names(names: list[str], most: int = 20, chars: int = 64) -> str:
    """Field names a client chose, for a log line: each quoted with its control characters escaped (a name
    holding a newline forged log lines) and cut to `chars`, at most `most` of them (a 1 MiB body of
    unknown keys was one 1 MiB line per request)."""
    shown = [repr(n if len(n) <= chars else n[:chars] + "...") for n in names[:most]]
    return ", ".join(shown) + (f", ... ({len(names)} in all)" if len(names) > most else "")


def _engine_error(exc: Exception) -> APIError:
    """The HTTP error for an engine-side failure of a request that was admitted."""
    if isinstance(exc, RequestFailed):
        return APIError(500, str(exc), type="server_error", code="engine_error")
    if isinstance(exc, EngineDead):
        return APIError(503, str(exc), type="server_error", code="engine_dead")
    log.error("request failed unexpectedly", exc_info=exc)
    return APIError(500, f"internal server error ({type(exc).__name__})", type="server_error")


async def _finished(result: GenerationResult) -> AsyncIterator[GenerationResult]:
    """A choice with nothing to decode, as a stream: its result alone. (Defined before the deployment
    class: Serve's ingress copies the class's methods with the module's globals as they are then.)"""
    yield result


@serve.deployment(name="FdllmServer", health_check_period_s=10)
@serve.ingress(api)
class FdllmServer:
    """One replica: checkpoint -> engine -> OpenAI routes."""

    def __init__(self, config: dict[str, Any]) -> None:
        import fdllm

        log_through_serve()
        self.cfg = ServerConfig.from_args(config)
        path = local_checkpoint(self.cfg.model, self.cfg.cache_dir)
        device = self.cfg.device if self.cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = self.cfg.torch_dtype(device)
        overrides = {k: v for k, v in (("threshold", self.cfg.threshold),
                                       ("use_sub_block_cache", self.cfg.use_sub_block_cache)) if v is not None}
        engine = fdllm.Engine.from_pretrained(path, config=fdllm.BlockDiffusionConfig.from_checkpoint(path, **overrides),
                                              device=device, dtype=dtype, engine_config=self.cfg.engine_config(),
                                              default_mode=self.cfg.default_mode)
        self.default_mode = engine.default_mode
        if self.cfg.default_mode is None and self.default_mode == "ar":
            log.warning("%s is not a block-diffusion fine-tune (no fdllm_config.json): requests that give no mode "
                        "decode AR (set default_mode, or mode per request, to decode otherwise)", self.cfg.model)
        self.tokenizer = check_text_tokenizer(engine.tokenizer, self.cfg.model)  # as fdllm-serve checks it up front
        self.max_model_len, self.vocab_size = engine.max_model_len, engine.model.config.vocab_size
        self.scores_causally = engine.scores_causally  # whether `logprobs` can be served (Engine.score)
        self.sampling_defaults = (generation_defaults(engine.model.config.generation_config)
                                  if self.cfg.generation_config == "auto" else {})
        if self.sampling_defaults:
            log.info("requests that do not set them sample with the checkpoint's generation_config.json defaults %s "
                     "(generation_config=none: OpenAI's)", self.sampling_defaults)
        self.stop_token_ids_for = engine.stop_token_ids_for  # what ends a request: its stream never sends that text
        self.engine = AsyncEngine(engine, max_waiting=self.cfg.max_waiting)
        self.model_name = self.cfg.model_name or default_model_name(self.cfg.model)
        self.api_key = self.cfg.api_key or os.environ.get(API_KEY_ENV) or None
        self.counters = RequestCounters()
        self.registry = make_registry(self.counters, self.engine)
        self.exporter = RayMetricsExporter(self.counters, self.engine, self.cfg.metrics_interval_s)
        self.replica = serve.get_replica_context().replica_id.unique_id  # which replica answered: /health
        log.info("serving %s as %r on %s (%s), replica %s; requests that give no mode decode %s", path, self.model_name,
                 device, dtype, self.replica, self.default_mode)

    def check_health(self) -> None:
        """Serve restarts a replica whose engine loop died."""
        self.engine.check_alive()

    # ---- routes ---------------------------------------------------------------------------------
    @api.get("/health")
    def health(self) -> dict[str, Any]:
        try:
            self.engine.check_alive()
        except EngineDead as exc:
            raise APIError(503, str(exc), type="server_error") from exc
        return {"status": "ok", "model": self.model_name, "replica": self.replica, **self.engine.stats()}

    @api.get("/metrics")
    def metrics(self) -> Response:
        return Response(render(self.registry), media_type="text/plain; version=0.0.4")

    @api.get("/openapi.json", include_in_schema=False)
    def openapi(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse(request.app.openapi())

    @api.get("/docs", include_in_schema=False)
    def docs(self, request: Request) -> HTMLResponse:
        self._authorize(request)
        return get_swagger_ui_html(openapi_url="openapi.json", title="fdllm API")

    @api.get("/v1/models")
    def models(self, request: Request) -> dict[str, Any]:
        self._authorize_counted(request, "models")
        return {"object": "list", "data": [self._model_card()]}

    @api.get("/v1/models/{model:path}")
    def model(self, model: str, request: Request) -> dict[str, Any]:
        """OpenAI's retrieve (`client.models.retrieve(name)`); a name with a slash is one model's name."""
        self._authorize_counted(request, "models")
        try:
            self._check_model(model)
        except APIError as err:
            raise self._reject("models", err) from None
        return self._model_card()

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "owned_by": "fdllm", "created": 0}

    @api.post("/v1/completions", openapi_extra=openapi_body(CompletionRequest))
    async def completions(self, request: Request) -> Response:
        return await self._handle(request, CompletionRequest, "completions", self._serve)

    @api.post("/v1/chat/completions", openapi_extra=openapi_body(ChatCompletionRequest))
    async def chat_completions(self, request: Request) -> Response:
        return await self._handle(request, ChatCompletionRequest, "chat", self._serve)

    # The tokenizer, as vLLM and SGLang serve it: clients (lm-evaluation-harness's local-completions,
    # prompt-length budgeting) count, truncate and send token ids with the server's own tokenizer.
    @api.post("/tokenize", openapi_extra=openapi_body(TokenizeRequest))
    async def tokenize(self, request: Request) -> Response:
        return await self._handle(request, TokenizeRequest, "tokenize", self._tokenize)

    @api.post("/detokenize", openapi_extra=openapi_body(DetokenizeRequest))
    async def detokenize(self, request: Request) -> Response:
        return await self._handle(request, DetokenizeRequest, "detokenize", self._detokenize)

    @api.get("/tokenizer_info")
    def tokenizer_info(self, request: Request) -> dict[str, Any]:
        self._authorize_counted(request, "tokenizer_info")
        tok = self.tokenizer
        return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                "pad_token": tok.pad_token, "chat_template": tok.chat_template, "model_max_length": self.max_model_len}

    # ---- helpers --------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # the header's bytes as sent (the ASGI server decodes them as Latin-1), against the key's UTF-8: a UTF-8
        # encoded twice never matched a non-ASCII key
        given = token.lstrip(" ").encode("latin-1")
        # the scheme is case-insensitive (RFC 9110 §11.1: "bearer" is "Bearer"); the key is compared in constant time
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self.api_key.encode()):
            raise APIError(401, "missing or invalid API key (Authorization: Bearer ...)",
                           type="authentication_error", code="invalid_api_key")

    def _authorize_counted(self, request: Request, endpoint: str) -> None:
        try:
            self._authorize(request)
        except APIError as err:
            raise self._reject(endpoint, err) from None

    def _reject(self, endpoint: str, err: APIError) -> APIError:
        self.counters.by_status[(endpoint, err.status)] += 1
        return err

    def _check_model(self, name: str | None) -> None:
        """404 unless the request names this server's model (or, where it is optional, none)."""
        if name is not None and name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def _check_prompt_chars(self, body: CompletionRequest | ChatCompletionRequest | TokenizeRequest) -> None:
        chars = prompt_chars(body)
        if chars > self.cfg.max_prompt_chars:
            raise APIError(400, f"the prompt has {chars} characters; this server takes at most {self.cfg.max_prompt_chars}",
                           param="messages" if getattr(body, "messages", None) else "prompt", code="prompt_too_long")

    async def _read_body(self, request: Request) -> bytes:
        """The raw body, refused (413) once it passes max_body_bytes: never buffered past the limit."""
        limit = self.cfg.max_body_bytes
        too_large = APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.cfg.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    chunks.append(chunk)
        except TimeoutError:
            raise APIError(408, f"request body not received within {self.cfg.body_timeout_s:g} s",
                           code="request_timeout") from None
        return b"".join(chunks)

    async def _handle(self, request: Request, model: type, endpoint: str, respond) -> Response:
        """Key, then body, then `respond(body, endpoint, request)`: each failure an OpenAI error counted
        under its status."""
        try:
            self._authorize(request)
            body = parse_request(model, await self._read_body(request))
            return await respond(body, endpoint, request)
        except APIError as err:
            raise self._reject(endpoint, err) from None
        except (asyncio.CancelledError, TaskCancelledError):  # the client hung up before its answer (Serve cancels)
            self.counters.by_status[(endpoint, CLIENT_CLOSED)] += 1
            raise

    def _prompt_ids(self, body: CompletionRequest | ChatCompletionRequest | TokenizeRequest) -> list[list[int]]:
        """Render (chat) and tokenize the request's prompts (one, or a completion's batch). Runs on a
        worker thread: a huge prompt must stall neither the event loop nor the engine thread."""
        from fdllm.tokenizer import render_chat

        if getattr(body, "messages", None):  # a chat completion, or /tokenize of messages
            messages = body.message_dicts()  # its own 400 for a non-text part, not one the template is blamed for
            try:
                text = render_chat(self.tokenizer, messages, getattr(body, "add_generation_prompt", True),
                                   body.chat_template_kwargs)
            except Exception as exc:  # noqa: BLE001 - templates reject structures with any error (raise_exception)
                raise APIError(400, f"the chat template rejected these messages: {exc}", param="messages") from None
            return [self._encode(text, False, "messages")]
        prompts = body.prompt if isinstance(body, CompletionRequest) else [body.prompt]
        add_special_tokens = getattr(body, "add_special_tokens", True)
        return [_in_vocabulary(list(p), self.vocab_size, "prompt") if isinstance(p, list)
                else self._encode(p, add_special_tokens, "prompt") for p in prompts]

    def _encode(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        try:
            return encode_prompt(self.tokenizer, text, add_special_tokens)
        except Exception as exc:  # noqa: BLE001 - e.g. text the tokenizer cannot encode
            raise APIError(400, f"the prompt could not be tokenized: {exc}", param=param) from None

    async def _tokenize(self, body: TokenizeRequest, endpoint: str, request: Request) -> Response:
        self._check_model(body.model)
        self._check_prompt_chars(body)
        (ids,) = await asyncio.to_thread(self._prompt_ids, body)
        self.counters.by_status[(endpoint, 200)] += 1
        return JSONResponse({"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids})

    async def _detokenize(self, body: DetokenizeRequest, endpoint: str, request: Request) -> Response:
        self._check_model(body.model)
        _in_vocabulary(body.tokens, self.vocab_size, "tokens")
        text = await asyncio.to_thread(self.tokenizer.decode, body.tokens)
        self.counters.by_status[(endpoint, 200)] += 1
        return JSONResponse({"prompt": text})

    async def _serve(self, body: CompletionRequest | ChatCompletionRequest, endpoint: str, request: Request) -> Response:
        """A completion or chat completion: n choices per prompt (a completion may batch prompts), each an
        engine request, all continuously batched together; choice i * n + j answers prompt i."""
        self._check_model(body.model)
        params = body.sampling_params(self.cfg.default_max_tokens or self.max_model_len, self.default_mode,
                                      self.cfg.block_lookahead, self.sampling_defaults)
        body.check_logit_bias(self.vocab_size)
        if ignored := body.ignored_fields():
            log.warning("%s request: fields ignored (not part of this API): %s", endpoint, _field_names(ignored))
        if body.logprob_count() is not None and not self.scores_causally:
            raise APIError(400, NO_CAUSAL_LOGPROBS, param="logprobs", code="unsupported_value")
        if body.num_choices > self.cfg.max_waiting:  # could never be admitted at once
            raise APIError(400, f"{body.num_choices} choices (prompts x n) in one request; this server queues at most "
                           f"{self.cfg.max_waiting}", param="n" if body.n > 1 else "prompt")
        self._check_prompt_chars(body)
        prompts = await asyncio.to_thread(self._prompt_ids, body)
        echoing, n = isinstance(body, CompletionRequest) and body.echo, body.n
        echoes = await asyncio.to_thread(self._echoes, body, prompts) if echoing else [""] * len(prompts)
        head = ResponseHead(new_id("cmpl" if endpoint == "completions" else "chatcmpl"), self.model_name)
        rid = head.id
        fault = self.cfg.fault_injection and request.headers.get(FAULT_HEADER) == "step"
        per_prompt = [self._fit_context(params, ids, body, i) for i, ids in enumerate(prompts)]
        choices = [(ids, choice_params(p, j)) for ids, p in zip(prompts, per_prompt) for j in range(n)]
        if body.scores_only:  # the legacy API's scoring request: each choice its prompt, no token
            streams = [_finished(GenerationResult(request_id=rid, prompt_token_ids=ids)) for ids, _ in choices]
        else:
            streams = await self._admit([self.engine.add(ids, p, rid if len(choices) == 1 else f"{rid}-{k}",
                                                         inject_fault=fault) for k, (ids, p) in enumerate(choices)], body)
        if body.stream:
            self.counters.by_status[(endpoint, 200)] += 1
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return EventStream(self._sse(streams, head, endpoint, tuple(params.stop), echoes, n, include_usage,
                                         self.stop_token_ids_for(params)),
                               media_type="text/event-stream")
        results: list = [None] * len(streams)
        try:
            async for k, event in interleave(streams):
                results[k] = event
        except Exception as exc:  # noqa: BLE001 - mapped to an OpenAI error
            raise _engine_error(exc) from None
        top = body.logprob_count()
        logprobs = [None] * len(results) if top is None else await asyncio.gather(
            *(self._logprobs(prompts[k // n], r, top, endpoint, echoing, params.cache_salt) for k, r in enumerate(results)))
        self.counters.by_status[(endpoint, 200)] += 1
        for k in range(len(results)):
            self.counters.record(results, k, n)
        answers = [Choice(r, echoes[k // n] + r.text, lp) for k, (r, lp) in enumerate(zip(results, logprobs))]
        if endpoint == "chat":
            return JSONResponse(chat_response(head, answers))
        return JSONResponse(completion_response(head, answers, n))

    def _fit_context(self, params: SamplingParams, ids: list[int],
                     body: CompletionRequest | ChatCompletionRequest, index: int = 0) -> SamplingParams:
        """`params` for prompt `ids` (the request's prompt `index`) within the context: a prompt that does not
        fit it, or would not with the request's max_tokens, is OpenAI's 400 `context_length_exceeded`,
        checked here where the field is known (the engine's own refusal names none; in a batch of prompts,
        `prompt[i]`); a request without max_tokens generates up to ServerConfig.default_max_tokens, never
        past the end of the context (its min_tokens within that); one with max_tokens 0 (echo: scoring)
        needs only its prompt to fit."""
        given, room = body.max_tokens_given(), self.max_model_len - len(ids)
        if room < (1 if given is None else given):
            field = ("messages" if hasattr(body, "messages") else
                     "prompt" if len(body.prompt) == 1 else f"prompt[{index}]")
            raise APIError.of(context_length_exceeded(field, self.max_model_len, len(ids), given))
        if given is not None:
            return params
        granted = min(room, self.cfg.default_max_tokens or room)
        body.check_min_tokens(granted)
        return replace(params, max_new_tokens=granted)

    def _echoes(self, body: CompletionRequest, prompts: list[list[int]]) -> list[str]:
        """Each prompt's text, as echo returns it: as sent, or its token ids decoded."""
        return [p if isinstance(p, str) else self.tokenizer.decode(ids) for p, ids in zip(body.prompt, prompts)]

    async def _admit(self, adds: list, body: CompletionRequest | ChatCompletionRequest) -> list[RequestStream]:
        """The streams of a request's choices once the engine has admitted all of them (`add_all`), before
        any byte is sent, so a refusal is the response's status: the first answers at once, as an OpenAI
        error, and every choice already added is aborted. The engine's refusal of `body` names the field
        it is about (`engine_refusal`: token ids past the vocabulary, text delimiters no token holds)."""
        try:
            return await add_all(adds)
        except ValueError as exc:
            raise body.engine_refusal(exc) from None
        except EngineOverloaded as exc:
            raise APIError(503, str(exc), type="server_error", code="overloaded") from None
        except Exception as exc:  # noqa: BLE001 - mapped to an OpenAI error
            raise _engine_error(exc) from None

    async def _logprobs(self, prompt_ids: list[int], result, top: int, endpoint: str, echo: bool,
                        cache_salt: str | None) -> dict[str, Any]:
        """A choice's `logprobs`: one causal scoring forward over prompt + completion (Engine.score),
        for the completion's tokens (with `echo`, the prompt's too; without, the prompt's cached blocks
        are read, not recomputed: under the request's `cache_salt`, the blocks it cached itself)."""
        try:
            scored = await self.engine.score(prompt_ids + result.token_ids, top, 1 if echo else len(prompt_ids),
                                             cache_salt)
        except ValueError as exc:  # a bad request (AsyncEngine.score's), e.g. more alternatives than the vocabulary
            raise APIError(400, str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - mapped to an OpenAI error
            raise _engine_error(exc) from None
        build = chat_logprobs if endpoint == "chat" else completion_logprobs
        pieces = partial(token_pieces, self.tokenizer)
        return await asyncio.to_thread(build, scored, 0 if echo else len(prompt_ids), pieces)

    async def _sse(self, streams: list, head: ResponseHead, endpoint: str, stop: tuple[str, ...], echoes: list[str], n: int,
                   include_usage: bool, stop_token_ids: frozenset[int] = frozenset()):
        """Server-sent events of every choice as its tokens come, each chunk naming its choice's index;
        with `include_usage`, a last chunk with no choices carries the usage, every other chunk
        `"usage": null` (OpenAI's stream_options).
        The generator's cancellation or close (client gone) aborts every request. A failure ends the stream with
        an error event and `[DONE]`. `echoes`: a completion's prompt texts (with echo), each sent first
        in its choices."""
        detoks = [IncrementalDetokenizer(self.tokenizer, stop, stop_token_ids) for _ in streams]
        results: list = [None] * len(streams)
        chat = endpoint == "chat"

        def send(data: dict[str, Any]) -> str:
            return sse(data | {"usage": None} if include_usage else data)

        def chunk(k: int, text: str, finish: str | None = None) -> str:
            return send(chat_chunk(head, {"content": text} if text or not finish else {}, finish, k)
                        if chat else completion_chunk(head, text, finish, k))

        try:
            for k in range(len(streams)):
                if chat:
                    yield send(chat_chunk(head, {"role": "assistant", "content": ""}, None, k))
                elif echoes[k // n]:
                    yield chunk(k, echoes[k // n])
            async for k, event in interleave(streams):
                if isinstance(event, GenerationResult):
                    results[k] = event
                    self.counters.record(results, k, n)
                    rest = detoks[k].finish(event.text)
                    if rest:
                        yield chunk(k, rest)
                    yield chunk(k, "", event.finish_reason)
                    if include_usage and all(r is not None for r in results):
                        yield sse(usage_chunk(head, chat, results, n))
                else:
                    text = detoks[k].push(event.token_ids)
                    if text:
                        yield chunk(k, text)
        except Exception as exc:  # noqa: BLE001 - the status line is sent: report in the stream
            err = _engine_error(exc)
            self.counters.stream_errors += 1
            yield error_event(err)
        finally:  # the client gone before the choices' tokens were read: interleave never closed them
            for stream in streams:
                await stream.aclose()
        yield "data: [DONE]\n\n"


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run serve.app:build_app key=value ...` and serve/config.yaml."""
    return bind_app(ServerConfig.from_args(dict(args)))


def bind_app(cfg: ServerConfig) -> serve.Application:
    """The deployment serving `cfg`: Serve's options from its fields, every field as each replica's args
    (`build_app` without the parsing, for a caller that validated `cfg` already)."""
    options: dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
        "ray_actor_options": {"num_cpus": cfg.num_cpus_per_replica, "num_gpus": cfg.num_gpus_per_replica},
    }
    if cfg.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = cfg.max_replicas_per_node
    if cfg.session_affinity:
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=SessionAffinityRouter, request_router_kwargs={"max_imbalance": cfg.session_max_imbalance})
    if cfg.autoscaling_config is not None:
        options["autoscaling_config"] = cfg.autoscaling_config
    elif cfg.num_replicas is not None:  # unset: Serve's 1, or what a config file's `deployments:` says
        options["num_replicas"] = cfg.num_replicas
    return FdllmServer.options(**options).bind(asdict(cfg))


def run_local(args: dict[str, Any], host: str = "127.0.0.1", port: int | None = None, timeout_s: float = 120.0,
              proxy_location: str = "EveryNode") -> str:
    """Deploy the app on the local Ray instance (started if none is) with Serve on host:port (a free
    port when None); returns the base URL once /health answers. For load tests and integration tests
    (`proxy_location="HeadOnly"` when several nodes share one machine, hence one port space)."""
    import socket
    import urllib.request

    import ray

    ray.init(ignore_reinit_error=True)
    if port is None:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
    serve.start(proxy_location=proxy_location, http_options={"host": host, "port": port})
    serve.run(build_app(args), name="fdllm", route_prefix="/")
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout_s
    while True:  # serve.run returns when the replica is up; the proxy may learn the route a moment later
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return url
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not become healthy in {timeout_s:.0f} s")
        time.sleep(0.5)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `fdllm.EngineConfig` field, named as vLLM's are (`--max-num-seqs`,
    `--gpu-memory-utilization`, `--enforce-eager` / `--no-enforce-eager`, ...). Unset flags keep the
    field's default."""
    import fdllm

    group = parser.add_argument_group("engine", "fdllm.EngineConfig fields (see its comments; unset: its default)")
    for f in fields(fdllm.EngineConfig):
        flag, kind = "--" + f.name.replace("_", "-"), str(f.type)
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"default: {f.default}")
        else:
            parse, metavar = (int, "N") if kind.startswith("int") else (float, "X") if kind.startswith("float") else (str, "S")
            group.add_argument(flag, type=parse, default=None, choices=ENGINE_CHOICES.get(f.name),
                               metavar=None if f.name in ENGINE_CHOICES else metavar, help=f"default: {f.default}")


def engine_overrides(args: argparse.Namespace) -> dict[str, Any] | None:
    """The `EngineConfig` fields fdllm-serve's flags set (None: the defaults)."""
    import fdllm

    given = {f.name: getattr(args, f.name) for f in fields(fdllm.EngineConfig) if getattr(args, f.name) is not None}
    return given or None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """fdllm-serve's command line."""
    parser = argparse.ArgumentParser(prog="fdllm-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint dir (HF format with tokenizer) or s3:// / gs:// URI")
    parser.add_argument("--model-name", help="name clients use as 'model' (default: the dir name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help=f"require this bearer token (default: ${API_KEY_ENV})")
    parser.add_argument("--num-replicas", type=int, help="a fixed replica count (default 1; or --autoscaling-config)")
    parser.add_argument("--num-gpus-per-replica", type=float, default=None, help="default: 1 when a GPU is visible")
    parser.add_argument("--threshold", type=float, help="default confidence threshold (checkpoint's by default)")
    parser.add_argument("--block-lookahead", action="store_true",
                        help="diffusion requests run each block's first step in the forward that opens it unless they "
                        "set block_lookahead themselves (fewer forwards; an approximation beyond the paper)")
    parser.add_argument("--session-affinity", action="store_true",
                        help="route requests with an x-session-id header to one replica per session, so a "
                        "conversation's turns share its prefix cache (default: Serve's router for all)")
    parser.add_argument("--default-mode", choices=MODES,
                        help="mode of requests that give none (default: diffusion for a block-diffusion checkpoint, "
                        "one with fdllm_config.json; ar for a plain AR one)")
    parser.add_argument("--default-max-tokens", type=int,
                        help="tokens a request without max_tokens may generate (default: the rest of the context)")
    parser.add_argument("--generation-config", choices=GENERATION_CONFIGS, default="auto",
                        help="auto: the sampling fields a request does not set (temperature, top_p, top_k, "
                        "repetition_penalty) default to the checkpoint's generation_config.json, as vLLM's; none: OpenAI's")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    add_server_arguments(parser, {action.dest for action in parser._actions})
    add_engine_arguments(parser)
    return parser.parse_args(argv)


def add_server_arguments(parser: argparse.ArgumentParser, given: set[str]) -> None:
    """One flag for each `ServerConfig` field the flags above do not set (`--max-ongoing-requests 256`,
    `--autoscaling-config '{"min_replicas": 1, "max_replicas": 4}'`, `--graceful-shutdown-timeout-s 600`),
    its value read as `serve run ... key=value` reads it (`ServerConfig.from_args`). Unset: the field's default."""
    group = parser.add_argument_group("server", "serve.app.ServerConfig fields (see its comments; unset: its default)")
    for f in fields(ServerConfig):
        if f.name in given or f.name in ("engine", "fault_injection"):  # engine: its own flags; faults: chaos tests only
            continue
        flag = "--" + f.name.replace("_", "-")
        if bool in (get_args(f.type) or (f.type,)):
            group.add_argument(flag, dest=f"server_{f.name}", action=argparse.BooleanOptionalAction, help=f"default: {f.default}")
        else:
            group.add_argument(flag, dest=f"server_{f.name}", metavar="JSON" if "dict" in str(f.type) else "X",
                               help=f"default: {f.default}")


def server_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The `ServerConfig` fields `add_server_arguments`' flags set."""
    prefix = "server_"
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


def main(argv: list[str] | None = None) -> None:
    """`fdllm-serve --model DIR`: start local Ray + Serve and block until Ctrl-C."""
    import ray

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    gpus = args.num_gpus_per_replica
    if gpus is None:
        gpus = 1.0 if torch.cuda.is_available() else 0.0
    options = {"model": args.model, "model_name": args.model_name, "api_key": args.api_key,
               "num_replicas": args.num_replicas, "num_gpus_per_replica": gpus,
               "threshold": args.threshold, "block_lookahead": args.block_lookahead or None, "default_mode": args.default_mode,
               "default_max_tokens": args.default_max_tokens, "session_affinity": args.session_affinity,
               "device": args.device, "dtype": args.dtype, "engine": engine_overrides(args),
               "generation_config": args.generation_config, **server_overrides(args)}
    try:  # every option checked before Ray and Serve start: one line, argparse's exit status
        if not 1 <= args.port <= 65535:
            raise ValueError(f"port must be in 1..65535, got {args.port}")
        check_no_shadowing("serve.app", "fdllm.engine")
        cfg = ServerConfig.from_args(options)
        _check_checkpoint(cfg)
        app = bind_app(cfg)  # Serve checks its deployment options here (e.g. a negative GPU count), Ray or not
    except ValueError as e:
        print(f"fdllm-serve: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for warning in exposure_warnings(args.host, args.api_key, os.environ.get(API_KEY_ENV)):
        log.warning("%s", warning)
    ray.init(ignore_reinit_error=True)
    serve.start(http_options={"host": args.host, "port": args.port})
    log.info("OpenAI API on http://%s:%d/v1", args.host, args.port)
    try:
        serve.run(app, name="fdllm", route_prefix="/", blocking=True)
    except RuntimeError:  # Serve's own error names the deployment only: "Failed to update the deployments [...]"
        print(f"fdllm-serve: error: the replicas failed to start: {replica_failure('fdllm')}", file=sys.stderr)
        raise SystemExit(1) from None


def exposure_warnings(host: str, flag_key: str | None, env_key: str | None) -> list[str]:
    """What fdllm-serve warns of before it listens on `host`: serving beyond this machine (an address
    other than loopback: 0.0.0.0, ::, a LAN address) without an API key lets anyone who reaches the
    port generate on its GPUs; a key given as `--api-key` is in the command line, which every user of
    the machine can read (ps, /proc/PID/cmdline)."""
    import ipaddress

    warnings = []
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: what it resolves to is the network's business
        loopback = False
    if not loopback and not (flag_key or env_key):
        warnings.append(f"serving on {host} without an API key: anyone who can reach this port can use the model "
                        f"(set ${API_KEY_ENV}, or --host 127.0.0.1)")
    if flag_key:
        warnings.append(f"--api-key puts the key in this process's command line, readable by every user of the "
                        f"machine (ps); prefer ${API_KEY_ENV}")
    return warnings


def replica_failure(app: str) -> str:
    """The exception an application's replicas failed to start with, as Serve's status records it (the
    last line of the replica's traceback), for a one-line error instead of Serve's."""
    status = serve.status().applications.get(app)
    for deployment in status.deployments.values() if status else ():
        if lines := [line for line in deployment.message.splitlines() if line.strip()]:
            return lines[-1].strip()
    return "see the replica logs above"


def _check_checkpoint(cfg: ServerConfig) -> None:
    """ValueError (one line) unless the replicas can serve `cfg.model` (fdllm.loader.check_checkpoint: a
    local directory or a URI, whose weights are not downloaded here) as `cfg` asks: they would find out
    only after Ray and Serve started, and fail again at each restart. The engine settings are checked
    against the checkpoint's block size, and a default mode other than AR needs a mask token: without
    one every request that gives no mode would be refused."""
    import fdllm
    from fdllm.loader import check_checkpoint
    from fdllm.tokenizer import load_text_tokenizer, mask_token_id

    try:
        local = check_checkpoint(cfg.model, need_tokenizer=True, cache_dir=cfg.cache_dir)
    except (OSError, ValueError, ImportError) as exc:  # missing files, an unreachable store, no pyarrow for a URI
        raise ValueError(f"model: {' '.join(str(exc).splitlines())}") from None
    diffusion = fdllm.BlockDiffusionConfig.from_checkpoint(local)
    cfg.engine_config().check_for(diffusion.block_size)
    if cfg.default_mode in (None, "ar") or diffusion.mask_token_id is not None:
        return
    if mask_token_id(load_text_tokenizer(local, cfg.model)) is None:
        raise ValueError(f"default_mode {cfg.default_mode!r} needs a mask token and {cfg.model} has none (no "
                         "mask_token_id in fdllm_config.json, no |<MASK>| in its tokenizer): a plain AR checkpoint "
                         "decodes mode 'ar'; fine-tune it first (pipelines/finetune.py) for diffusion")


if __name__ == "__main__":
    main()
