"""Ray Serve application: OpenAI-compatible inference with continual learning.

Two deployments make the application:

- `SomiWriter` (one replica) owns the named ModelActor, the single writer of the model. It
  forwards learn requests to it, applies the per-holder learn rate limit and caches the
  current model version. Version checks wait on the ModelActor only when the cache is older
  than the refresh interval and no learn call is in flight.
- `SomiServer` (the FastAPI ingress, N replicas) serves `/v1/completions`,
  `/v1/chat/completions`, `/v1/models`, `/v1/learn`, `/v1/status` and `/healthz`. Each
  replica generates from its own copy of a versioned snapshot (`ModelActor.snapshot`) and
  loads a new one when the writer reports a newer version.

Ray, torch and FastAPI are imported inside functions, so importing this module (which the
`somi-ray` command does for every command) stays cheap.
"""


import hashlib
import hmac
import json
import logging
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

logger = logging.getLogger(__name__)

APP_NAME = "somi"
ACTOR_NAMESPACE = "somi"


@dataclass
class ServeOptions:
    """Settings of one Serve application; every replica receives a copy."""

    checkpoint_dir: str  # SOMI checkpoint folder that the ModelActor loads and commits to
    model_name: str = ""  # id in /v1/models and responses; default: the folder name
    replicas: int = 1  # SomiServer replicas
    replica_cpus: float = 0.25  # CPUs reserved per SomiServer replica
    writer_cpus: float = 0.1  # CPUs reserved for the SomiWriter replica
    model_actor_cpus: float = 0.25  # CPUs reserved for the ModelActor
    learn_tokens: list[str] = field(default_factory=list)  # bearer tokens allowed to learn; empty: learning is open
    read_token: str | None = None  # bearer token required for reads; None: reading is open
    max_body_bytes: int = 65536  # request bodies above this size are rejected before parsing
    max_prompt_tokens: int = 512  # tokens of a prompt or of one learn text
    max_tokens_limit: int = 256  # upper bound of a request's max_tokens
    max_n: int = 8  # upper bound of a request's n
    max_learn_texts: int = 16  # texts per /v1/learn request
    learn_rate: float = 2.0  # learn requests per second per holder (token bucket refill)
    learn_burst: int = 10  # token bucket size per holder
    learn_window: int = 64  # tokens per learning window
    refresh_ms: int = 200  # a replica checks the model version at most this often (ms)
    context: int = 512  # tokens of context the model sees while generating
    fusion_weights: tuple[float, float, float] = (1.0, 0.5, 0.5)  # exponents of confidence, consistency, stability

    def __post_init__(self) -> None:
        self.checkpoint_dir = str(Path(self.checkpoint_dir).resolve())
        self.model_name = self.model_name or Path(self.checkpoint_dir).name
        self.learn_tokens = list(self.learn_tokens)
        self.fusion_weights = tuple(float(w) for w in self.fusion_weights)
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")


# ------------------------------------------------------------------------------ request bodies


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _SamplingRequest(_Strict):
    """Fields that both generation endpoints accept; `learn` and `somi_select` extend the OpenAI ones."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    user: str | None = None
    learn: bool = False  # learn from the prompt before answering (needs a learn token when one is set)
    somi_select: Literal["fusion"] | None = None  # with n > 1, return only the candidate with the best fusion score


class CompletionRequest(_SamplingRequest):
    """Body of POST /v1/completions."""

    prompt: str
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)  # top log-probabilities returned per token
    echo: bool = False  # return the prompt with the completion (and its log-probabilities with `logprobs`)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_SamplingRequest):
    """Body of POST /v1/chat/completions; messages are rendered as "role: content" lines."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class LearnRequest(_Strict):
    """Body of POST /v1/learn: one text or a list of texts."""

    text: str | None = None
    texts: list[str] | None = None


def render_chat(messages: list[ChatMessage]) -> str:
    """Plain-text chat prompt: SOMI has no chat template, so each message becomes "role: content"."""
    lines = [f"{message.role}: {message.content}" for message in messages]
    return "\n".join(lines) + "\nassistant:"


# ------------------------------------------------------------------------------ errors


class ApiError(Exception):
    """An HTTP error in OpenAI's error shape; `param` names the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def validation_error(error: ValidationError) -> ApiError:
    """The first pydantic error as a 400 that names the field by its dotted path."""
    first = error.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or "body"
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"unknown field '{param}'", param, "unknown_field")
    if first["type"] == "missing":
        return ApiError(400, f"missing required field '{param}'", param, "missing_field")
    return ApiError(400, f"invalid field '{param}': {first['msg']}", param, "invalid_field")


def _reject_constant(name: str):
    raise ApiError(400, f"body is not valid JSON: {name} is not a JSON number", "body", "invalid_json")


def parse_json_body(raw: bytes) -> dict:
    """Decode a request body as strict UTF-8 JSON that must be an object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(400, f"body is not valid UTF-8 (byte {error.start})", "body", "invalid_encoding") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as error:
        raise ApiError(400, f"body is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}",
                       "body", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"body must be a JSON object, got {type(data).__name__}", "body", "invalid_json")
    return data


class TokenBucket:
    """Per-holder rate limit: `rate` requests per second, bursts of up to `burst`."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate = float(rate)
        self.burst = float(burst)
        self.clock = clock
        self.levels: dict[str, tuple[float, float]] = {}  # holder -> (tokens, time of last update)

    def take(self, holder: str) -> float:
        """Take one token; returns 0.0 on success, else the seconds until one is available."""
        now = self.clock()
        tokens, last = self.levels.get(holder, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self.levels[holder] = (tokens - 1.0, now)
            return 0.0
        self.levels[holder] = (tokens, now)
        return (1.0 - tokens) / self.rate if self.rate > 0 else math.inf


# ------------------------------------------------------------------------------ model side


def model_from_snapshot(snapshot: dict):
    """Build an eval-mode SomiModel and its tokenizer from `ModelActor.snapshot()`."""
    import numpy as np
    import torch
    from tokenizers import Tokenizer

    from somi_ray.config import SomiConfig
    from somi_ray.lineage import _match_tract_shapes
    from somi_ray.model import SomiModel

    model = SomiModel(SomiConfig.from_dict(snapshot["config"]))
    # Arrays from the object store are read-only views, so each is copied before torch owns it.
    state = {name: torch.from_numpy(np.array(value, copy=True)) for name, value in snapshot["state"].items()}
    _match_tract_shapes(model, state)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, Tokenizer.from_str(snapshot["tokenizer_json"])


def special_token_ids(tokenizer) -> set[int]:
    return {index for index, token in tokenizer.get_added_tokens_decoder().items() if token.special}


def score_completion(model, prompt_ids: list[int], completion_ids: list[int]) -> dict:
    """SOMI's scores of one completion, all measured on prompt + completion.

    - mean_stress: mean JEPA stress of the positions that predict the completion tokens.
    - settle_stability: per Part visit, (1 - fraction of rejected correction steps) /
      (1 + relative energy change of the last correction step), averaged over visits and
      completion positions; 1.0 means the field was already at rest.
    - consistency: mean cosine between the settled fields of successive positions, from the
      last prompt position through the completion, averaged over Part visits.
    """
    import torch
    import torch.nn.functional as F

    from somi_ray.physics.settle import settle

    P, N = len(prompt_ids), len(completion_ids)
    full = torch.tensor([prompt_ids + completion_ids], dtype=torch.long, device=model.device)  # (1, P+N)
    with torch.no_grad():
        stress = model.measure_stress(full)["per_token"][0, P - 1:]  # (N,)
        out = model.run(full)

        stabilities, cosines = [], []
        for visit in out.visits:
            free, _ = model.parts[visit.part].operators()
            result = settle(free, visit.drive[:, P:], track_energy=True)  # energies: each (1, N)
            if len(result.energies) >= 2:
                previous, last = result.energies[-2], result.energies[-1]
                change = float(((last - previous).abs() / previous.abs().clamp_min(1e-6)).mean())
                rejected = result.rejected / ((len(result.energies) - 1) * N)
            else:
                change, rejected = 0.0, 0.0
            stabilities.append((1.0 - rejected) / (1.0 + change))

            phi = visit.phi[0, P - 1:]  # (N+1, H)
            cosines.append(float(F.cosine_similarity(phi[:-1], phi[1:], dim=-1).mean()))

    return {
        "mean_stress": float(stress.mean()),
        "settle_stability": float(sum(stabilities) / len(stabilities)),
        "consistency": float(sum(cosines) / len(cosines)),
    }


def completion_logprobs(model, tokenizer, prompt: str, prompt_ids: list[int], completion_ids: list[int], k: int,
                        echo: bool) -> dict:
    """OpenAI's `logprobs` object of one completion: tokens, their log-probabilities, top-k and offsets.

    One forward pass over prompt + completion scores every token with the model's unsampled
    distribution. With `echo` the prompt's tokens come first; the very first one has no
    log-probability, as in OpenAI's API. Offsets count characters of prompt + completion text.
    """
    import torch

    ids = prompt_ids + completion_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids], device=model.device))[0].float(), dim=-1)  # (L, V)
    top_values, top_ids = torch.topk(logprobs, k, dim=-1) if k > 0 else (None, None)
    offsets = [start for start, _ in tokenizer.encode(prompt).offsets]
    text = prompt
    for token in completion_ids:
        offsets.append(len(text))
        text += tokenizer.decode([token], skip_special_tokens=False)

    first = 0 if echo else len(prompt_ids)
    result = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for position in range(first, len(ids)):
        result["tokens"].append(tokenizer.decode([ids[position]], skip_special_tokens=False))
        result["text_offset"].append(offsets[position] if position < len(offsets) else len(text))
        if position == 0:
            result["token_logprobs"].append(None)
            result["top_logprobs"].append(None)
            continue
        result["token_logprobs"].append(float(logprobs[position - 1, ids[position]]))
        top: dict[str, float] = {}
        if k > 0:
            for value, token in zip(top_values[position - 1].tolist(), top_ids[position - 1].tolist()):
                string = tokenizer.decode([token], skip_special_tokens=False)
                # Two ids can decode to the same string (for example partial UTF-8); their mass adds up.
                previous = top.get(string)
                top[string] = value if previous is None else max(previous, value) + math.log1p(
                    math.exp(-abs(previous - value)))
        result["top_logprobs"].append(top)
    return result


def fusion_score(mean_logprob: float, consistency: float, stability: float,
                 weights: tuple[float, float, float]) -> float:
    """Log of confidence^a * ((1 + consistency) / 2)^b * stability^c.

    Confidence is exp(mean log-probability), the geometric mean probability of the sampled
    tokens; the consistency cosine is mapped from [-1, 1] to [0, 1].
    """
    a, b, c = weights
    return (a * mean_logprob
            + b * math.log(max((1.0 + consistency) / 2.0, 1e-9))
            + c * math.log(max(stability, 1e-9)))


@dataclass
class Decoding:
    """Step-by-step sampling of n candidates for one prompt, with stop strings."""

    model: object
    tokenizer: object
    prompt_ids: list[int]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    stops: list[str]
    seed: int | None
    special_ids: set[int]
    context: int

    def __post_init__(self) -> None:
        import torch

        self.generator = torch.Generator(device=self.model.device)
        self.generator.manual_seed(self.seed if self.seed is not None else int.from_bytes(uuid.uuid4().bytes[:8], "little") >> 1)
        self.sequence = torch.tensor([self.prompt_ids] * self.n, dtype=torch.long, device=self.model.device)  # (n, P)
        self.tokens: list[list[int]] = [[] for _ in range(self.n)]
        self.logprobs: list[list[float]] = [[] for _ in range(self.n)]
        self.texts = [""] * self.n
        self.sent = [""] * self.n  # text already streamed per candidate
        self.finish_reasons: list[str | None] = [None] * self.n
        self.steps = 0

    @property
    def done(self) -> bool:
        return all(reason is not None for reason in self.finish_reasons)

    def step(self) -> None:
        """Sample one token for every candidate; finished candidates ignore theirs."""
        import torch

        new, logprobs = self.model.generate(self.sequence, 1, temperature=self.temperature, top_p=self.top_p,
                                            generator=self.generator, context=self.context)  # each (n, 1)
        self.sequence = torch.cat([self.sequence, new], dim=1)
        self.steps += 1
        for i in range(self.n):
            if self.finish_reasons[i] is not None:
                continue
            token = int(new[i, 0])
            if token in self.special_ids:
                self.finish_reasons[i] = "stop"
                continue
            self.tokens[i].append(token)
            self.logprobs[i].append(float(logprobs[i, 0]))
            self.texts[i] = self.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
            cut = min((self.texts[i].find(s) for s in self.stops if s in self.texts[i]), default=-1)
            if cut >= 0:
                self.texts[i] = self.texts[i][:cut]
                self.finish_reasons[i] = "stop"
            elif self.steps >= self.max_tokens:
                self.finish_reasons[i] = "length"

    def delta(self, i: int) -> str:
        """Text of candidate i not streamed yet.

        While the candidate runs, an incomplete UTF-8 sequence and a tail that could begin a
        stop string wait for the next token, so streamed text equals the non-streamed text.
        """
        text = self.texts[i]
        if self.finish_reasons[i] is None:
            if text.endswith("\ufffd"):
                return ""
            held = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - held]
        piece = text[len(self.sent[i]):]
        self.sent[i] = text
        return piece

    def scores(self, i: int) -> dict:
        tokens = self.tokens[i]
        if not tokens:
            return {"mean_logprob": None, "mean_stress": None, "settle_stability": None, "consistency": None}
        scores = score_completion(self.model, self.prompt_ids, tokens)
        scores["mean_logprob"] = sum(self.logprobs[i]) / len(self.logprobs[i])
        return scores


# ------------------------------------------------------------------------------ deployments


def build_deployments(options: ServeOptions):
    """Bind the SomiWriter and SomiServer deployments into one Serve application."""
    from ray import serve

    # Replicas open an internal gRPC server on [::]; the hook rebinds it to 127.0.0.1.
    runtime_env = {"worker_process_setup_hook": "actors.runtime.loopback_grpc_hook"}
    writer_cls = serve.deployment(
        _make_writer_class(), name="SomiWriter", num_replicas=1, max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": options.writer_cpus, "runtime_env": runtime_env},
    )
    server_cls = serve.deployment(
        _make_server_class(), name="SomiServer", num_replicas=options.replicas, max_ongoing_requests=64,
        ray_actor_options={"num_cpus": options.replica_cpus, "runtime_env": runtime_env},
    )
    return server_cls.bind(asdict(options), writer_cls.bind(asdict(options)))


def build_app(args: dict):
    """Application builder for `serve run actors.serve_app:build_app checkpoint_dir=...`."""
    known = set(ServeOptions.__dataclass_fields__)
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown Serve application arguments {unknown}; known ones are {sorted(known)}")
    if "learn_tokens" in args and isinstance(args["learn_tokens"], str):
        args = dict(args, learn_tokens=[token for token in args["learn_tokens"].split(",") if token])
    return build_deployments(ServeOptions(**args))


def _make_writer_class():
    from actors.model_actor import ACTOR_NAME, remote_model_actor

    class SomiWriter:
        """Owner of the ModelActor: learn requests, the learn rate limit and the cached version."""

        def __init__(self, options: dict):
            import ray

            self.options = ServeOptions(**options)
            self.actor = remote_model_actor(self.options.checkpoint_dir, num_cpus=self.options.model_actor_cpus,
                                            namespace=ACTOR_NAMESPACE)
            info = ray.get(self.actor.info.remote())
            if not info.get("initialized"):
                raise RuntimeError(f"no SOMI checkpoint at {self.options.checkpoint_dir}; create one before serving")
            if info["path"] != self.options.checkpoint_dir:
                raise RuntimeError(f"the ModelActor '{ACTOR_NAME}' already serves {info['path']}, "
                                   f"not {self.options.checkpoint_dir}")
            self.version = int(info["version"])
            self.checked = time.monotonic()
            self.learning = 0  # learn calls in flight
            self.bucket = TokenBucket(self.options.learn_rate, self.options.learn_burst)
            self.accepted = 0
            logger.info("SomiWriter serving %s at version %d", self.options.checkpoint_dir, self.version)

        async def current_version(self) -> int:
            """The model version, asking the ModelActor at most once per refresh interval when idle."""
            now = time.monotonic()
            if self.learning == 0 and now - self.checked >= self.options.refresh_ms / 1000.0:
                self.checked = now
                info = await self.actor.info.remote()
                self.version = max(self.version, int(info["version"]))
            return self.version

        async def learn(self, texts: list[str], holder: str) -> dict:
            """Rate-limit, then learn through the ModelActor; returns the new version or why it was rejected."""
            # NOTE: the buckets live in this one replica and start full again if Serve restarts it.
            wait = self.bucket.take(holder)
            if wait > 0.0:
                return {"rejected": "rate", "retry_after": wait}
            self.learning += 1
            try:
                row = await self.actor.learn_texts.remote(texts, self.options.learn_window, {"source": "serve"})
            except Exception as error:  # noqa: BLE001 (the ModelActor's ValueError arrives wrapped by Ray)
                logger.warning("learn request from %s failed: %s", holder, error)
                return {"rejected": "failed", "message": str(getattr(error, "cause", error) or error)}
            finally:
                self.learning -= 1
            self.version = max(self.version, int(row["version"]))
            self.accepted += 1
            return {"version": int(row["version"]), "metrics": json.loads(row["metrics"])}

        async def model_actor(self):
            return self.actor

    return SomiWriter


def _make_server_class():
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from ray import serve

    app = FastAPI(title="SOMI", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @serve.ingress(app)
    class SomiServer:
        """FastAPI ingress: OpenAI-compatible generation from versioned snapshots, plus learning."""

        def __init__(self, options: dict, writer):
            import asyncio

            import ray
            import torch
            from ray.serve import metrics

            torch.set_num_threads(1)  # replicas share a few cores, so each computes on one thread
            self.options = ServeOptions(**options)
            self.writer = writer
            self.compute_lock = asyncio.Lock()
            self.refresh_lock = asyncio.Lock()
            self.model = None
            self.version = -1
            self.checked = 0.0
            self.actor = None
            self.ray = ray
            self.tokens = {hashlib.sha256(t.encode()).hexdigest(): f"learn-token-{i + 1}"
                           for i, t in enumerate(self.options.learn_tokens)}
            self.requests = metrics.Counter("somi_serve_requests", "HTTP requests by route and status",
                                            tag_keys=("route", "status"))
            self.latency = metrics.Histogram("somi_serve_latency_ms", "request latency in milliseconds",
                                             boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000],
                                             tag_keys=("route",))
            self.generated = metrics.Counter("somi_serve_generated_tokens", "completion tokens generated")
            self.learned = metrics.Counter("somi_serve_learn_events", "accepted learn requests")

        # -------------------------------------------------------------- helpers

        async def _refresh(self, at_least: int | None = None) -> tuple:
            """(model, tokenizer, special ids, version) of the newest snapshot, checked at most every refresh_ms."""
            import asyncio

            now = time.monotonic()
            stale = self.model is None or now - self.checked >= self.options.refresh_ms / 1000.0
            if at_least is not None and self.version < at_least:
                stale = True
            if stale:
                async with self.refresh_lock:
                    self.checked = time.monotonic()
                    version = await self.writer.current_version.remote()
                    if at_least is not None:
                        version = max(version, at_least)
                    if version != self.version:
                        if self.actor is None:
                            self.actor = await self.writer.model_actor.remote()
                        snapshot = await self.actor.snapshot.remote()
                        model, tokenizer = await asyncio.to_thread(model_from_snapshot, snapshot)
                        self.model, self.tokenizer = model, tokenizer
                        self.special_ids = special_token_ids(tokenizer)
                        self.version = int(snapshot["version"])
                        logger.info("SomiServer replica now serves version %d", self.version)
            return self.model, self.tokenizer, self.special_ids, self.version

        def _bearer(self, request: Request) -> str | None:
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None

        def _learn_holder(self, request: Request) -> str:
            """Holder id of the learn token on the request; raises 401 when learning is protected and it is absent."""
            if not self.tokens:
                return f"client-{request.client.host if request.client else 'unknown'}"
            token = self._bearer(request)
            if token is None:
                raise ApiError(401, "learning needs a bearer token in the Authorization header", "authorization",
                               "missing_token")
            digest = hashlib.sha256(token.encode()).hexdigest()
            for known, holder in self.tokens.items():
                if hmac.compare_digest(known, digest):
                    return holder
            raise ApiError(401, "the bearer token in the Authorization header may not learn", "authorization",
                           "invalid_token")

        def _check_read(self, request: Request) -> None:
            if self.options.read_token is None:
                return
            token = self._bearer(request)
            allowed = [self.options.read_token, *self.options.learn_tokens]
            if token is None:
                raise ApiError(401, "reading needs a bearer token in the Authorization header", "authorization",
                               "missing_token")
            if not any(hmac.compare_digest(token.encode(), t.encode()) for t in allowed):
                raise ApiError(401, "the bearer token in the Authorization header may not read", "authorization",
                               "invalid_token")

        async def _body(self, request: Request, schema):
            """Read at most max_body_bytes, then parse and validate; oversized bodies are never parsed."""
            limit = self.options.max_body_bytes
            declared = request.headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                raise ApiError(413, f"body of {declared} bytes exceeds the limit of {limit} bytes", "body",
                               "body_too_large")
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"body exceeds the limit of {limit} bytes", "body", "body_too_large")
                chunks.append(chunk)
            data = parse_json_body(b"".join(chunks))
            try:
                return schema.model_validate(data)
            except ValidationError as error:
                raise validation_error(error) from None

        def _encode(self, tokenizer, special_ids: set[int], text: str, field_name: str) -> list[int]:
            ids = tokenizer.encode(text).ids
            if not ids:
                raise ApiError(400, f"'{field_name}' is empty after tokenisation", field_name, "empty_prompt")
            if all(i in special_ids for i in ids):
                raise ApiError(400, f"'{field_name}' contains only special tokens", field_name, "empty_prompt")
            if len(ids) > self.options.max_prompt_tokens:
                raise ApiError(400, f"'{field_name}' has {len(ids)} tokens; the limit is "
                               f"{self.options.max_prompt_tokens}", field_name, "prompt_too_long")
            return ids

        def _check_sampling(self, body, max_tokens: int, max_tokens_field: str) -> list[str]:
            if body.model is not None and body.model != self.options.model_name:
                raise ApiError(404, f"model '{body.model}' not found; this server serves "
                               f"'{self.options.model_name}'", "model", "model_not_found")
            if max_tokens > self.options.max_tokens_limit:
                raise ApiError(400, f"'{max_tokens_field}' is {max_tokens}; the limit is "
                               f"{self.options.max_tokens_limit}", max_tokens_field, "invalid_field")
            if body.n > self.options.max_n:
                raise ApiError(400, f"'n' is {body.n}; the limit is {self.options.max_n}", "n", "invalid_field")
            stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
            if len(stops) > 4 or any(not s or len(s) > 64 for s in stops):
                raise ApiError(400, "'stop' takes up to 4 non-empty strings of at most 64 characters", "stop",
                               "invalid_field")
            if getattr(body, "logprobs", None) is not None and body.stream:
                raise ApiError(400, "'logprobs' is not supported with 'stream'; request it without streaming",
                               "logprobs", "invalid_field")
            if body.somi_select and body.stream:
                raise ApiError(400, "'somi_select' needs all candidates before answering, so it cannot be "
                               "combined with 'stream'", "somi_select", "invalid_field")
            return stops

        async def _learn(self, request: Request, texts: list[str]) -> int:
            holder = self._learn_holder(request)
            result = await self.writer.learn.remote(texts, holder)
            if result.get("rejected") == "rate":
                raise ApiError(429, f"learn rate limit of {self.options.learn_rate:g} requests per second "
                               f"reached for {holder}; retry in {result['retry_after']:.2f} s", "authorization",
                               "rate_limited")
            if result.get("rejected"):
                raise ApiError(400, f"learning failed: {result['message']}", "text", "learn_failed")
            self.learned.inc()
            return int(result["version"])

        async def _complete(self, request: Request, body, prompt: str, max_tokens: int, max_tokens_field: str,
                            prompt_field: str, chat: bool):
            import asyncio

            self._check_read(request)
            stops = self._check_sampling(body, max_tokens, max_tokens_field)
            model, tokenizer, special_ids, _ = await self._refresh()
            prompt_ids = self._encode(tokenizer, special_ids, prompt, prompt_field)
            if body.learn:
                learned = await self._learn(request, [prompt])
                model, tokenizer, special_ids, _ = await self._refresh(at_least=learned)
                prompt_ids = tokenizer.encode(prompt).ids
            version = self.version

            decoding = Decoding(model, tokenizer, prompt_ids, body.n, max_tokens, body.temperature, body.top_p,
                                stops, body.seed, special_ids, self.options.context)
            ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            created = int(time.time())
            if body.stream:
                return StreamingResponse(self._stream(decoding, ident, created, version, chat),
                                         media_type="text/event-stream")

            async with self.compute_lock:
                while not decoding.done:
                    await asyncio.to_thread(decoding.step)
                scores = [await asyncio.to_thread(decoding.scores, i) for i in range(body.n)]
            self._count_tokens(decoding)
            indices = list(range(body.n))
            fusion = [self._fusion(s) for s in scores]
            if body.somi_select == "fusion":
                indices = [max(indices, key=lambda i: -math.inf if fusion[i] is None else fusion[i])]

            choices = []
            for position, i in enumerate(indices):
                somi = dict(scores[i], fusion=fusion[i], version=version, candidate=i)
                text = decoding.texts[i]
                logprobs = None
                if not chat and body.logprobs is not None:
                    logprobs = await asyncio.to_thread(completion_logprobs, model, tokenizer, prompt, prompt_ids,
                                                       decoding.tokens[i], body.logprobs, body.echo)
                if not chat and body.echo:
                    text = prompt + text
                choice = {"index": position, "finish_reason": decoding.finish_reasons[i], "logprobs": logprobs,
                          "somi": somi}
                if chat:
                    choice["message"] = {"role": "assistant", "content": text}
                else:
                    choice["text"] = text
                choices.append(choice)
            completion_tokens = sum(len(t) for t in decoding.tokens)
            response = {
                "id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": self.options.model_name, "choices": choices,
                "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                          "total_tokens": len(prompt_ids) + completion_tokens},
                "somi": {"version": version, "learned": bool(body.learn), "select": body.somi_select,
                         "candidates": [dict(s, fusion=f) for s, f in zip(scores, fusion)]},
            }
            return JSONResponse(response)

        def _count_tokens(self, decoding: Decoding) -> None:
            total = sum(len(tokens) for tokens in decoding.tokens)
            if total > 0:  # Ray counters reject increments of 0
                self.generated.inc(total)

        def _fusion(self, scores: dict) -> float | None:
            if scores["mean_logprob"] is None:
                return None
            return fusion_score(scores["mean_logprob"], scores["consistency"], scores["settle_stability"],
                                self.options.fusion_weights)

        async def _stream(self, decoding: Decoding, ident: str, created: int, version: int, chat: bool):
            """Server-sent events in OpenAI's chunk format; the last chunk of a candidate carries its scores."""
            import asyncio

            kind = "chat.completion.chunk" if chat else "text_completion"

            def event(index: int, text: str | None, finish: str | None, somi: dict | None = None) -> str:
                if chat:
                    delta = {} if text is None else {"content": text}
                    if text is not None and not decoding.sent_role[index]:
                        delta["role"] = "assistant"
                        decoding.sent_role[index] = True
                    choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
                else:
                    choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
                if somi is not None:
                    choice["somi"] = somi
                chunk = {"id": ident, "object": kind, "created": created, "model": self.options.model_name,
                         "choices": [choice]}
                return f"data: {json.dumps(chunk)}\n\n"

            decoding.sent_role = [False] * decoding.n
            reported = [False] * decoding.n
            async with self.compute_lock:
                while not all(reported):
                    if not decoding.done:
                        await asyncio.to_thread(decoding.step)
                    for i in range(decoding.n):
                        if reported[i]:
                            continue
                        piece = decoding.delta(i)
                        if piece:
                            yield event(i, piece, None)
                        if decoding.finish_reasons[i] is not None:
                            scores = await asyncio.to_thread(decoding.scores, i)
                            somi = dict(scores, fusion=self._fusion(scores), version=version, candidate=i)
                            yield event(i, None, decoding.finish_reasons[i], somi)
                            reported[i] = True
            self._count_tokens(decoding)
            yield "data: [DONE]\n\n"

        async def _observe(self, route: str, started: float, call):
            status = 500
            try:
                response = await call()
                status = response.status_code
                return response
            except ApiError as error:
                status = error.status
                logger.info("rejected %s request with %d (%s): %s", route, error.status, error.param, error.message)
                return JSONResponse(error.body(), status_code=error.status)
            finally:
                self.requests.inc(tags={"route": route, "status": str(status)})
                self.latency.observe((time.perf_counter() - started) * 1000.0, tags={"route": route})

        # -------------------------------------------------------------- routes

        @app.post("/v1/completions")
        async def completions(self, request: Request):
            async def call():
                body = await self._body(request, CompletionRequest)
                return await self._complete(request, body, body.prompt, body.max_tokens, "max_tokens", "prompt",
                                            chat=False)

            return await self._observe("completions", time.perf_counter(), call)

        @app.post("/v1/chat/completions")
        async def chat_completions(self, request: Request):
            async def call():
                body = await self._body(request, ChatCompletionRequest)
                if body.max_completion_tokens is not None:
                    max_tokens, field_name = body.max_completion_tokens, "max_completion_tokens"
                else:
                    max_tokens, field_name = (body.max_tokens or 16), "max_tokens"
                return await self._complete(request, body, render_chat(body.messages), max_tokens, field_name,
                                            "messages", chat=True)

            return await self._observe("chat", time.perf_counter(), call)

        @app.post("/v1/learn")
        async def learn(self, request: Request):
            async def call():
                body = await self._body(request, LearnRequest)
                if (body.text is None) == (body.texts is None):
                    raise ApiError(400, "pass exactly one of 'text' and 'texts'", "text", "invalid_field")
                texts = [body.text] if body.text is not None else body.texts
                field_name = "text" if body.text is not None else "texts"
                if not texts or len(texts) > self.options.max_learn_texts:
                    raise ApiError(400, f"'texts' takes 1 to {self.options.max_learn_texts} texts, got {len(texts)}",
                                   "texts", "invalid_field")
                self._learn_holder(request)
                _, tokenizer, special_ids, _ = await self._refresh()
                tokens = 0
                for i, text in enumerate(texts):
                    name = field_name if body.text is not None else f"texts.{i}"
                    ids = self._encode(tokenizer, special_ids, text, name)
                    if len(ids) < 2:
                        raise ApiError(400, f"'{name}' has 1 token; learning needs at least 2", name,
                                       "text_too_short")
                    tokens += len(ids)
                version = await self._learn(request, texts)
                await self._refresh(at_least=version)
                return JSONResponse({"object": "learn", "version": version, "texts": len(texts), "tokens": tokens})

            return await self._observe("learn", time.perf_counter(), call)

        @app.get("/v1/models")
        async def models(self, request: Request):
            async def call():
                self._check_read(request)
                _, _, _, version = await self._refresh()
                return JSONResponse({"object": "list", "data": [{
                    "id": self.options.model_name, "object": "model", "created": 0, "owned_by": "somi-ray",
                    "somi_version": version}]})

            return await self._observe("models", time.perf_counter(), call)

        @app.get("/v1/status")
        async def status(self, request: Request):
            async def call():
                self._check_read(request)
                await self._refresh()
                info = await self.actor.info.remote()
                return JSONResponse({
                    "model": self.options.model_name, "version": info["version"], "replica_version": self.version,
                    "hidden_size": info["hidden_size"], "parts": info["n_parts"], "systems": info["n_systems"],
                    "vocab_size": info["vocab_size"], "parameters": info["parameters"],
                    "lineage_length": info["events"],
                    "stress_ema": [None if math.isnan(s) else s for s in info["stress_ema"]],
                    "teachers_absorbed": [t for t in info["teachers"] if t],
                    "learning": "token" if self.tokens else "open",
                    "reading": "token" if self.options.read_token else "open",
                })

            return await self._observe("status", time.perf_counter(), call)

        @app.get("/healthz")
        async def healthz(self):
            return JSONResponse({"status": "ok", "version": self.version})

    return SomiServer


# ------------------------------------------------------------------------------ running and the CLI


def run_server(options: ServeOptions, host: str, port: int, address: str | None = None,
               num_cpus: float | None = None, block: bool = True) -> str:
    """Start Ray (embedded and loopback-only unless `address` is given) and the Serve application.

    Returns the base URL. With `block`, waits until Ctrl-C, then shuts Serve down.
    """
    from ray import serve

    from actors.runtime import RayOptions, start_ray

    start_ray(RayOptions(address=address, num_cpus=num_cpus))
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_deployments(options), name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}/v1"
    logger.info("SOMI Serve application %s is up at %s", options.model_name, url)
    if not block:
        return url
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("stopping the SOMI Serve application")
    finally:
        serve.shutdown()
    return url


def cmd_serve(args) -> int:
    import os
    import sys

    learn_tokens = list(args.learn_token or [])
    if os.environ.get("SOMI_LEARN_TOKEN"):
        learn_tokens.append(os.environ["SOMI_LEARN_TOKEN"])
    read_token = args.read_token or os.environ.get("SOMI_READ_TOKEN") or None
    from somi_ray.lineage import checkpoint_exists

    if not checkpoint_exists(args.dir):
        print(f"error: no SOMI checkpoint in {args.dir}", file=sys.stderr)
        return 2
    options = ServeOptions(checkpoint_dir=args.dir, replicas=args.replicas, learn_tokens=learn_tokens,
                           read_token=read_token, replica_cpus=args.replica_cpus, learn_rate=args.learn_rate,
                           max_tokens_limit=args.max_tokens_limit)
    if args.host != "127.0.0.1":
        print(f"warning: serving on {args.host}, which other machines may reach", file=sys.stderr)
    print(f"serving {options.model_name} at http://{args.host}:{args.port}/v1 (Ctrl-C stops)", file=sys.stderr)
    run_server(options, args.host, args.port, address=args.address, num_cpus=args.num_cpus)
    return 0


def register_cli(subparsers) -> None:
    """Add `somi-ray serve DIR`."""
    serve_parser = subparsers.add_parser(
        "serve", help="serve a checkpoint over an OpenAI-compatible HTTP API with continual learning")
    serve_parser.add_argument("dir", help="SOMI checkpoint folder")
    serve_parser.add_argument("--host", default="127.0.0.1", help="HTTP listen address (default 127.0.0.1)")
    serve_parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    serve_parser.add_argument("--learn-token", action="append",
                              help="bearer token allowed to learn; repeat for several holders "
                                   "(also read from SOMI_LEARN_TOKEN); without one, learning is open")
    serve_parser.add_argument("--read-token", help="bearer token required for reads (also read from "
                                                   "SOMI_READ_TOKEN); without one, reading is open")
    serve_parser.add_argument("--replicas", type=int, default=1, help="inference replicas")
    serve_parser.add_argument("--replica-cpus", type=float, default=0.25, help="CPUs reserved per replica")
    serve_parser.add_argument("--learn-rate", type=float, default=2.0,
                              help="learn requests per second per token holder")
    serve_parser.add_argument("--max-tokens-limit", type=int, default=256, help="upper bound of max_tokens")
    serve_parser.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    serve_parser.add_argument("--num-cpus", type=float, help="CPUs of the embedded Ray cluster")
    serve_parser.set_defaults(func=cmd_serve)
