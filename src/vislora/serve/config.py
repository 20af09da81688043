"""ServeConfig: one YAML file describes a server (base model, adapters, batching, limits, auth, what clients see,
rollouts)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from vislora.data.tiling import TilingConfig
from vislora.devices import DEVICE_CHOICES, DtypeName, check_device_name
from vislora.errors import ConfigError
from vislora.io import apply_overrides, read_mapping


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseSection(_Section):
    """The one base model every adapter is routed over. Omit it when the adapters carry task.json (written by
    `vislora train`): the base is then rebuilt from the first adapter's task.json, as `vislora eval` does.

    An image classifier (`kind: classifier`, the default) answers predict with its head and embed with the head's
    input. A dual encoder (`kind: dual_encoder`: CLIP, SigLIP, open_clip, or an image backbone paired with a text
    encoder by `text`) embeds images and texts into one space, and predicts with a prompt classifier built from
    each adapter's class names and templates. A generative VLM (`kind: generative`: a vision encoder `spec` joined
    to a causal LM `lm`, LLaVA-style, or one Hugging Face VLM `spec`) answers POST /v1/generate; `kwargs` takes
    vislora.vlm.build_vlm's connector_hidden, seed, max_length and system."""

    kind: Literal["classifier", "dual_encoder", "generative"] = Field("classifier", description="What the base "
                                                                      "model is.")
    spec: str = Field(..., description="timm:<name>, hf:<id or dir>, open_clip:<name>, or asset:dinov2-small.")
    pretrained: bool = Field(True, description="Load pretrained weights (timm/open_clip download them).")
    head: Literal["auto", "own", "linear"] = Field("auto", description="As in the train config's model.head.")
    pooling: Literal["cls", "mean", "cls_mean"] = Field("cls", description="Features a linear head (or a dual "
                                                         "encoder's image projection) reads.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra arguments for the model factory.")
    num_classes: int | None = Field(None, ge=1, description="Width of the classification head every adapter "
                                    "shares (classifiers only; required for them).")
    image_size: int | None = Field(None, ge=8, description="Square input side; default: the model's native size.")
    tiling: TilingConfig | None = Field(None, description="Classifiers trained with data.tiling: each request's image "
                                        "is cut into tiles whose features are pooled (as the train config's "
                                        "data.tiling; read from task.json when the base comes from an adapter).")
    classes: list[str] | None = Field(
        None, description="Names of the base head's outputs (dual encoders: the class names its zero-shot prompt "
        "classifier predicts). Only then does predict without an adapter answer; a head freshly built for the "
        "adapters predicts nothing meaningful on its own.")
    text: str | None = Field(None, description="Dual encoders: the text encoder paired with the image backbone "
                             "spec (hf:<id or dir>, asset:all-minilm-l6-v2); unset for CLIP/SigLIP/open_clip.")
    lm: str | None = Field(None, description="Generative bases: the causal LM joined to the vision encoder `spec` "
                           "(hf:<id or dir>, asset:smollm2-135m-instruct); unset for a whole Hugging Face VLM.")
    embed_dim: int = Field(256, ge=1, description="Dual encoders with `text`: width of the joint space.")
    text_pooling: Literal["mean", "cls"] = Field("mean", description="Dual encoders with `text`: text pooling.")
    templates: list[str] = Field(["a photo of a {}."], min_length=1, description="Dual encoders: prompt "
                                 "templates of the base's zero-shot classifier over `classes`.")

    @model_validator(mode="after")
    def _classes_fit(self) -> BaseSection:
        if self.kind == "classifier" and self.num_classes is None:
            raise ValueError("a classifier base needs num_classes (the head width every adapter shares)")
        if self.kind == "classifier" and self.text is not None:
            raise ValueError("text pairs a text encoder with the image backbone: set kind: dual_encoder too")
        if self.lm is not None and self.kind != "generative":
            raise ValueError("lm joins a causal language model to the vision encoder: set kind: generative too")
        if self.kind == "dual_encoder" and self.tiling is not None:
            raise ValueError("tiling pools the tiles of an image for a classifier; a dual_encoder base is not tiled: "
                             "drop base.tiling")
        if self.num_classes is not None and self.classes is not None and len(self.classes) != self.num_classes:
            raise ValueError(f"base.classes has {len(self.classes)} names but base.num_classes is {self.num_classes}")
        return self


class BatchingSection(_Section):
    max_batch_size: int = Field(16, ge=1, description="Most samples (shadow copies included) in one forward.")
    max_wait_ms: float = Field(5.0, ge=0, description="How long the first request of a batch waits for company.")
    max_queue: int = Field(1024, ge=1, description="Requests waiting beyond this get 503 (server busy).")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads of the forward; default: torch's.")


class LimitsSection(_Section):
    max_upload_bytes: int = Field(10 * 2**20, ge=1024, description="Larger request bodies get 413.")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Larger images get 413, refused from their header "
                                  "before decoding (decompression bombs).")
    max_text_chars: int = Field(10_000, ge=1, description="Longer texts get 400 (dual encoders truncate to their "
                                "text tower's token limit anyway).")
    max_top_k: int = Field(100, ge=1)
    max_search_k: int = Field(100, ge=1, description="Most hits POST /v1/search returns; a larger k gets 400.")
    unload_timeout_s: float = Field(60.0, gt=0, description="How long an unload waits for in-flight requests.")
    request_timeout_s: float = Field(60.0, gt=0, description="A request not computed by then gets 504 (and is "
                                     "dropped if its batch has not started).")


class HealthSection(_Section):
    """When /healthz answers `degraded`: thresholds judged over the last `window_s` seconds of inference requests
    (predict, embed, search). A threshold set to null is not judged. Failed requests are those answered 5xx (a
    forward that raised, a full queue, a timeout); 4xx answers are the client's mistake and count as answered."""

    window_s: float = Field(60.0, gt=0, description="Length of the sliding window the rates are judged over.")
    min_requests: int = Field(20, ge=1, description="Smallest sample the error rate, p95 latency and mean drift "
                              "are rated over: a window holding fewer requests (shadow runs) counts the missing ones "
                              "as answered fast and ok, so a single failure in a quiet window does not degrade.")
    max_error_rate: float | None = Field(0.05, ge=0, le=1, description="Share of requests answered 5xx.")
    max_p95_latency_s: float | None = Field(1.0, gt=0, description="95th percentile of request latency, seconds.")
    max_queue_depth: int | None = Field(None, ge=0, description="Requests waiting for a batch when judged.")
    max_memory_bytes: int | None = Field(None, ge=1, description="Resident memory of the server process when "
                                         "judged (process_resident_memory_bytes).")
    max_shadow_drift: float | None = Field(None, ge=0, description="Mean 1 - cosine of a rollout's shadow "
                                           "embeddings against its primary's.")


class AuthSection(_Section):
    """Bearer tokens. Admin endpoints (load/unload adapters, change rollouts) are refused while no admin token is
    set."""

    admin_token: SecretStr | None = Field(None, description="Prefer admin_token_env: config files get copied.")
    admin_token_env: str = Field("VISLORA_ADMIN_TOKEN", description="Environment variable holding the admin token.")
    client_token: SecretStr | None = Field(None, description="If set, predict/embed/adapters need it too.")
    client_token_env: str = Field("VISLORA_CLIENT_TOKEN", description="Environment variable holding the client "
                                  "token.")

    def admin(self) -> str | None:
        return _token(self.admin_token, self.admin_token_env)

    def client(self) -> str | None:
        return _token(self.client_token, self.client_token_env)


def _token(value: SecretStr | None, env: str) -> str | None:
    token = value.get_secret_value() if value is not None else os.environ.get(env)
    return token or None


BASE_SHADOW = "@base"  # a rollout's shadow spelled so: the base model, no adapter (adapter names start with a letter)
AdapterField = Literal["name", "source", "path", "digest", "classes", "bytes", "loaded_at"]
ADAPTER_FIELDS: tuple[str, ...] = get_args(AdapterField)
Access = Literal["open", "client", "admin"]


class ExposeSection(_Section):
    """What a client (any request without the admin token) may see; a request with the admin token sees
    everything. The defaults are the least the dashboard (it reads /v1/stats without a token) and clients need:
    no server file paths."""

    adapter_fields: list[AdapterField] = Field(
        ["name", "digest", "classes", "bytes", "loaded_at"], description="Fields of GET /v1/adapters and of "
        "/v1/stats `loaded` a client sees (source and path name server folders: admin only by default).")
    stats: Access = Field("open", description="Who may read /v1/stats: open (anyone: the dashboard page fetches it "
                          "without a token), client (the client token when one is set), admin.")
    metrics: Access = Field("client", description="Who may read /metrics: open, client (the client token when one "
                            "is set: give it to Prometheus as `authorization: {credentials: ...}`), admin.")

    @field_validator("adapter_fields")
    @classmethod
    def _named(cls, value: list[str]) -> list[str]:
        if "name" not in value:
            raise ValueError(f"adapter_fields must include name (requests choose adapters by it), got {value}")
        return value


class RolloutConfig(_Section):
    """A named rollout: requests naming it go to one of `weights`' adapters (weighted draw), and a fraction of them
    also runs on `shadow`, whose answer is compared with the primary's and never returned. `shadow: "@base"` runs
    the base model (no adapter): the cosine of its features and the drawn adapter's is the drift against the base."""

    weights: dict[str, float] = Field(..., min_length=1, description="Adapter -> relative share of the traffic.")
    shadow: str | None = Field(None, description="Adapter run beside the primary on a fraction of requests, or "
                               f"{BASE_SHADOW!r} for the base model (drift against the base).")
    shadow_fraction: float = Field(1.0, ge=0, le=1, description="Share of requests that also run the shadow.")

    @field_validator("shadow")
    @classmethod
    def _shadow_spelling(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("@") and value != BASE_SHADOW:
            raise ValueError(f"shadow {value!r} is neither an adapter name nor {BASE_SHADOW!r} (the base model); "
                             f"write shadow: {BASE_SHADOW!r} to compare the drawn adapter with the base")
        return value

    @field_validator("weights")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not v >= 0}
        if bad or not sum(value.values()) > 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {value}")
        return value

    def adapters(self) -> set[str]:
        """The adapters the rollout sends traffic to (the base shadow is none)."""
        return {*self.weights, *([self.shadow] if self.shadow and self.shadow != BASE_SHADOW else [])}


class GenerateSection(_Section):
    """Limits and batching of POST /v1/generate (generative bases). Requests over a limit get 400 naming it."""

    max_prompt_tokens: int = Field(512, ge=1, description="Most prompt tokens, the image's tokens and the chat "
                                   "template included.")
    max_new_tokens: int = Field(256, ge=1, description="Most tokens one request may ask to generate.")
    default_max_new_tokens: int = Field(64, ge=1, description="Tokens generated when a request names none (at most "
                                        "max_new_tokens).")
    max_temperature: float = Field(2.0, gt=0, description="Highest sampling temperature a request may ask for.")
    max_wait_ms: float | None = Field(None, ge=0, description="How long the first request of a generate batch "
                                      "waits for company; default: batching.max_wait_ms.")


class FeedbackSection(_Section):
    """How long answers wait for feedback (POST /v1/feedback names them by their request id)."""

    ttl_s: float = Field(3600.0, gt=0, description="An answer takes feedback for this long after it was given.")
    max_pending: int = Field(100_000, ge=1, description="Most answers waiting for feedback; beyond it the oldest "
                             "is dropped (about 300 bytes each). As many ids that expired, were dropped or got "
                             "their feedback are kept to say so.")


class ServeConfig(_Section):
    """A whole server. Load with `ServeConfig.load(path, overrides)`."""

    base: BaseSection | None = None
    adapters: dict[str, str] = Field(default_factory=dict, description="Name -> adapter directory, or "
                                     "registry:NAME[@VERSION] (default version: promoted), loaded at start.")
    registry: str | None = Field(None, description="Root folder of an adapter registry (vislora registry) that "
                                 "registry:NAME@VERSION references are resolved in.")
    adapter_root: str | None = Field(None, description="If set, adapters loaded over HTTP must lie inside this "
                                     "folder (relative paths are read from it).")
    batching: BatchingSection = Field(default_factory=BatchingSection)
    limits: LimitsSection = Field(default_factory=LimitsSection)
    auth: AuthSection = Field(default_factory=AuthSection)
    health: HealthSection = Field(default_factory=HealthSection)
    expose: ExposeSection = Field(default_factory=ExposeSection)
    rollouts: dict[str, RolloutConfig] = Field(default_factory=dict, description="Rollouts (weighted traffic "
                                               "splits with an optional shadow) by name.")
    feedback: FeedbackSection = Field(default_factory=FeedbackSection)
    generate: GenerateSection = Field(default_factory=GenerateSection)
    indexes: dict[str, str] = Field(default_factory=dict, description="Search indexes (vislora index build) by "
                                    "name, for POST /v1/search: name -> index folder.")
    device: str = Field("cpu", description=f"Where the forward runs: {DEVICE_CHOICES} (auto = cuda when "
                        "available, else mps, else cpu). Answers are float32 whatever the device.")
    dtype: DtypeName = Field("float32", description="Weights and inputs of the forward: float32, bfloat16 (CPU or "
                             "GPU), float16 (GPU only).")
    seed: int = Field(0, description="Seed of the traffic split and shadow draws.")
    top_k: int = Field(5, ge=1, description="Labels returned by predict unless the request says otherwise.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        try:
            return check_device_name(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _buildable(self) -> ServeConfig:
        if self.base is None and not self.adapters:
            raise ValueError("give a base model (base.spec, base.num_classes) or at least one adapter trained by "
                             "`vislora train` (its task.json names the base)")
        clash = sorted(set(self.rollouts) & set(self.adapters))
        if clash:
            raise ValueError(f"rollout names {clash} are also adapter names; a request names either one")
        return self

    @classmethod
    def parse(cls, data: dict[str, Any]) -> ServeConfig:
        """Validate a config mapping; ConfigError naming every problem."""
        if "routes" in data:
            raise ConfigError(f"the serve config key `routes` was renamed `rollouts` (weighted traffic splits with "
                              f"a shadow), got routes: {data['routes']!r}; rename the key to `rollouts`, its "
                              "entries stay as they are")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
                                 for err in exc.errors())
            raise ConfigError(f"invalid serve config: {problems}") from None

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ServeConfig:
        """Read YAML, apply `key.path=value` overrides, validate."""
        return cls.parse(apply_overrides(read_config(path), overrides))


def read_config(path: str | Path) -> dict[str, Any]:
    """The mapping in a serve config YAML file, adapter paths made absolute (relative ones are read from the
    file's folder)."""
    path = Path(path)
    data = read_mapping(path, "serve config", "base, adapters, batching, ...; see docs/serving.md for an example")
    adapters = data.get("adapters") or {}
    if not isinstance(adapters, dict):
        raise ConfigError(f"{path}: adapters must map names to directories, got {adapters!r}")
    folder = path.resolve().parent
    data["adapters"] = {name: _from(folder, str(source)) for name, source in adapters.items()}
    for key in ("registry", "adapter_root"):
        if data.get(key):
            data[key] = _from(folder, str(data[key]))
    if isinstance(data.get("indexes"), dict):
        data["indexes"] = {name: _from(folder, str(index)) for name, index in data["indexes"].items()}
    return data


def _from(folder: Path, source: str) -> str:
    """A path read from `folder` if relative; registry references unchanged."""
    return source if source.startswith("registry:") else str(folder / Path(source).expanduser())
