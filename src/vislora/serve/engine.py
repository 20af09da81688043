"""Engine: one base model, many adapters, requests micro-batched across adapters into one forward pass.

Every forward routes each sample to its own adapter (`AdaptedModel(x, adapters=[...])`), so a batch mixing 128
adapters costs one pass. A route is state on the model's layers, so one worker thread runs every forward and
adapter loads/unloads take the same lock: no request sees a half-loaded adapter. An adapter being unloaded
takes no new requests and is removed once its in-flight requests have their answers. A rollout (a name that
splits requests between adapters by weight, with a shadow) is resolved before a request is queued.

The model runs on the engine's `Placement` (vislora.devices: ServeConfig `device` and `dtype`, CPU float32 by
default): batches are sent there (through pinned memory to a GPU) and answers come back float32 on the CPU.

`vislora.serve.factory.build_engine` builds the engine a ServeConfig describes:

    with build_engine(ServeConfig.parse({"adapters": {"cats": "runs/cats/adapter"}})) as engine:
        engine.predict("cat.png", adapter="cats").labels[0]
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vislora.data.transforms import InputSpec, build_transform
from vislora.devices import Placement
from vislora.errors import BadImage, Busy, ConfigError, Conflict, ServeError, UnknownAdapter
from vislora.formats import check_adapter
from vislora.model import AdaptedModel
from vislora.registry import fingerprint
from vislora.serve.batcher import Job, MicroBatcher
from vislora.serve.calls import BlockingCalls, ImageInput
from vislora.serve.config import (
    BASE_SHADOW,
    BaseSection,
    BatchingSection,
    FeedbackSection,
    HealthSection,
    LimitsSection,
    RolloutConfig,
)
from vislora.serve.feedback import FeedbackBook
from vislora.serve.health import HealthCollector, HealthMonitor
from vislora.serve.images import decode_image
from vislora.serve.metrics import NO_ADAPTER, ServeMetrics
from vislora.serve.openmp import release_team
from vislora.serve.records import LoadedAdapter, Output, tagger_of
from vislora.serve.sources import AdapterSource, check_base_weights, check_fits, open_source
from vislora.serve.traffic import Assignment, TrafficPolicy, record_shadow, shadow_route
from vislora.tasks.tiled import TiledClassifier

logger = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,63}")


def check_name(name: str, what: str = "adapter") -> str:
    """`name` if it is 1-64 letters, digits, '_' or '-' starting with a letter (no path can hide in it)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ServeError(f"invalid {what} name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a letter")
    return name


class Engine(BlockingCalls):
    """Serves predictions and embeddings of a base model with any number of adapters; thread-safe. This class
    serves image classifiers; `DualEngine` adds texts for a dual-encoder base (`build_engine` picks the class)."""

    modalities: tuple[str, ...] = ("image",)

    def __init__(self, model: AdaptedModel, head_path: str | None, input_spec: InputSpec, base: BaseSection, *,
                 batching: BatchingSection | None = None, limits: LimitsSection | None = None,
                 rollouts: dict[str, RolloutConfig] | None = None, seed: int = 0,
                 metrics: ServeMetrics | None = None, registry: str | Path | None = None,
                 feedback: FeedbackSection | None = None, health: HealthSection | None = None,
                 placement: Placement | None = None) -> None:
        self.model = model.eval()
        self.head_path = head_path
        self.input_spec = input_spec
        tiled = model.base_model if isinstance(model.base_model, TiledClassifier) else None
        self.base = base.model_copy(update={"image_size": tiled.input_size, "tiling": tiled.tiling} if tiled else
                                    {"image_size": input_spec.size})
        self.batching = batching or BatchingSection()
        self.limits = limits or LimitsSection()
        self.metrics = metrics or ServeMetrics()
        self.health = HealthMonitor(health, queue_depth=lambda: self.queue_depth, not_serving=self.not_serving)
        self.metrics.registry.register(HealthCollector(lambda: self.health.judge()))
        self.transform = build_transform(input_spec, train=False)
        self.registry = registry  # root of the adapter registry that registry:NAME@VERSION sources name
        self.traffic = TrafficPolicy(seed=seed)
        self.feedback = FeedbackBook(feedback or FeedbackSection(), self.metrics)  # answers awaiting feedback
        self._state = threading.Condition()  # guards the four fields below
        self._adapters: dict[str, LoadedAdapter] = {}
        self._inflight: Counter[str] = Counter()  # adapter -> requests admitted, not yet answered
        self._pending: set[str] = set()  # adapters being loaded or unloaded: no request may use them
        self._model_lock = threading.Lock()  # one forward, or one change of the model, at a time
        self._base_print: str | None = None  # fingerprint of the base weights, to check registry adapters against
        if registry is not None and not model.adapters:
            self._base_print = fingerprint(model.base_model, exclude=(head_path,) if head_path else ())
        self.placement = placement or Placement.cpu()  # where the forward runs; answers are float32 on the CPU
        self.placement.place(model)  # after the fingerprint: registry adapters name the base as it was trained
        if self.batching.threads and self.placement.is_cpu:
            torch.set_num_threads(self.batching.threads)
        self.metrics.model_bytes.set(sum(t.numel() * t.element_size() for t in (
            *model.base_model.parameters(), *model.base_model.buffers())))
        self._batcher = MicroBatcher(self._run_batch, self.batching.max_batch_size, self.batching.max_wait_ms / 1e3,
                                     self.batching.max_queue)
        self.metrics.bind_queue(lambda: self._batcher.depth)
        for name in model.adapters:  # adapters already on the model are served as they are
            self._register(name, LoadedAdapter(name, "(in memory)", "", "", self._classes(None), self._bytes(name),
                                               time.time()))
        for name, rollout in (rollouts or {}).items():
            self.set_rollout(name, rollout)
        self._prepare()
        self._release_team()  # this thread's OpenMP team would slow the batch worker's (see vislora.serve.openmp)
        self._batcher.start()

    # ------------------------------------------------------------ adapters and rollouts
    def adapters(self) -> list[LoadedAdapter]:
        with self._state:
            return [a for n, a in self._adapters.items() if n not in self._pending]

    def load(self, name: str, source: str | Path | AdapterSource) -> LoadedAdapter:
        """Load an adapter (a directory, or registry:NAME[@VERSION]) as `name`; requests can use it once this
        returns, never before."""
        check_name(name)
        source = source if isinstance(source, AdapterSource) else open_source(source, self.registry)
        self._check_fits(name, source)
        check_base_weights(name, source, self._base_print, self.head_path)
        classes = self._classes(source)
        checked = self._read(source)  # disk reads and checks outside the model lock
        with self._state:
            self._check_free(name)
            self._pending.add(name)
        try:
            with self._model_lock:
                self._install(name, checked)
                self._place_adapter(name)
                try:
                    self._installed(name, source)
                except BaseException:
                    self.model.delete_adapter(name)
                    raise
                size = self._bytes(name)
            record = LoadedAdapter(name, source.reference, str(source.path), source.digest, classes, size,
                                   time.time(), tagger_of(source.task))
            self._register(name, record)
        finally:
            with self._state:
                self._pending.discard(name)
            self._release_team()
        return record

    def unload(self, name: str, timeout: float | None = None) -> None:
        """Stop admitting requests for `name`, let its in-flight requests finish, then remove it."""
        timeout = self.limits.unload_timeout_s if timeout is None else timeout
        with self._state:
            if name in self._pending:
                raise Conflict(f"adapter {name!r} is being loaded or unloaded already; retry when that is done")
            if name not in self._adapters:
                raise UnknownAdapter(f"no adapter {name!r} is loaded (loaded: {self._loaded_names()})")
            rollouts = self.traffic.using(name)
            if rollouts:
                raise Conflict(f"rollouts {rollouts} send traffic to adapter {name!r}; change or delete them first")
            self._pending.add(name)
            if not self._state.wait_for(lambda: self._inflight[name] == 0, timeout):
                self._pending.discard(name)
                raise Busy(f"adapter {name!r} still has {self._inflight[name]} requests in flight after {timeout} s; "
                           "it stays loaded, retry the unload")
        try:
            with self._model_lock:
                self.model.delete_adapter(name)
                self._removed(name)
        finally:
            with self._state:
                del self._adapters[name]
                self._pending.discard(name)
                sizes = {n: a.bytes for n, a in self._adapters.items()}
            self.metrics.loaded(sizes, gone=name, changed=())

    def set_rollout(self, name: str, rollout: RolloutConfig) -> None:
        """Add or replace a rollout (weighted split, optional shadow); every adapter it names must be loaded."""
        check_name(name, "rollout")
        with self._state:
            if name in self._adapters or name in self._pending:
                raise Conflict(f"{name!r} is an adapter's name; a rollout needs a name of its own")
            missing = sorted(n for n in rollout.adapters() if n not in self._adapters or n in self._pending)
            if missing:
                raise UnknownAdapter(f"rollout {name!r} names adapters that are not loaded: {missing} "
                                     f"(loaded: {self._loaded_names()})")
            self.traffic.set(name, rollout)

    def delete_rollout(self, name: str) -> None:
        if self.traffic.remove(name) is None:
            raise UnknownAdapter(f"no rollout {name!r} (rollouts: {sorted(self.traffic.rollouts)})")

    # ------------------------------------------------------------ requests
    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """Pixels (3, size, size) exactly as training evaluated: files and bytes read by load_image with the run's
        DICOM window, then the timm eval transform of the base model."""
        if isinstance(image, str | Path):
            image = Path(image).read_bytes()
        if isinstance(image, bytes):
            image = decode_image(image, self.limits.max_image_pixels, self.input_spec.window)
        if isinstance(image, Image.Image):
            image = image.convert("RGB")
        elif not (torch.is_tensor(image) and image.dim() == 3 and image.shape[0] == 3 and image.is_floating_point()):
            raise BadImage(f"expected a PIL image, a float tensor [3, H, W] from vislora.data.load_image, bytes or a "
                           f"path, got {type(image).__name__}")
        pixels = self.transform(image)
        self._release_team()  # this request thread's OpenMP team would slow the batch worker's (+8% images/s)
        return pixels

    def submit(self, pixels: torch.Tensor, adapter: str | None = None) -> Future[Output]:
        """Queue one preprocessed sample for `adapter` (an adapter, a rollout, or None = the base model)."""
        size, shape = self.input_spec.size, tuple(pixels.shape)  # size None: a tiled base takes any size
        if len(shape) != 3 or shape[0] != 3 or (size is not None and shape[1:] != (size, size)):
            expected = f"(3, {size}, {size})" if size else "(3, H, W)"
            raise BadImage(f"pixels have shape {shape}, expected {expected}; use engine.preprocess()")
        return self._enqueue(pixels, adapter, "image")

    def preprocess_text(self, text: str) -> torch.Tensor:
        """Token ids and attention mask (2, tokens) of one text; only dual-encoder bases embed texts."""
        raise self._no_texts()

    def submit_text(self, tokens: torch.Tensor, adapter: str | None = None) -> Future[Output]:
        """Queue one text, tokenized by `preprocess_text`, for `adapter` (an adapter, a rollout, or None)."""
        if "text" not in self.modalities:
            raise self._no_texts()
        if tokens.dim() != 2 or tokens.shape[0] != 2:
            raise ServeError(f"tokens have shape {tuple(tokens.shape)}, expected (2, length) from "
                             "engine.preprocess_text()")
        return self._enqueue(tokens, adapter, "text")

    def _no_texts(self) -> ServeError:
        return ServeError(f"this server's base ({self.base.spec}) is an image classifier and embeds images only; "
                          "text embeddings need a dual-encoder base (CLIP, SigLIP, open_clip, or base.text set)")

    def _enqueue(self, inputs: torch.Tensor, adapter: str | None, modality: str) -> Future[Output]:
        assignment = self._admit(adapter)
        return self._submit_job(Job(inputs, assignment.adapter, assignment.shadow, assignment.rollout, modality),
                                assignment)

    def _submit_job(self, job: Job, assignment: Assignment) -> Future:
        """Queue `job`, admitted as `assignment`; the assignment is released once the job is answered or refused."""
        job.future.add_done_callback(lambda _: self._release(assignment))
        try:
            return self._batcher.submit(job)
        except Busy:
            job.future.cancel()  # runs the release callback
            raise

    def check_predicts(self, adapter: str | None) -> None:
        """Refuse predict without an adapter when the base head names no classes."""
        if adapter is None and self.base.classes is None:
            raise ServeError(f"name an adapter (loaded: {self._loaded_names()}): this base model's head was built "
                             "for the adapters and predicts nothing meaningful alone (set base.classes if it does)")

    # ------------------------------------------------------------ lifecycle
    @property
    def ready(self) -> bool:
        return self.not_serving() is None

    def not_serving(self) -> str | None:
        """Why the engine takes no requests now (closing, or its batch worker stopped); None while it serves."""
        if self._batcher.closing:
            if not self._batcher.alive:
                return "the engine is closed"
            return "the engine is closing: new requests are refused while the queued ones are answered"
        if not self._batcher.alive:
            return "the batch worker is not running (it stopped unexpectedly: see the server log); restart the server"
        return None

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch."""
        return self._batcher.depth

    def in_flight(self, adapter: str) -> int:
        """Requests admitted for `adapter` (as primary or shadow) and not answered yet."""
        with self._state:
            return self._inflight[adapter]

    @property
    def base_fingerprint(self) -> str | None:
        """The registry's fingerprint of the served base weights, that registry adapters are checked against
        (None without a registry)."""
        return self._base_print

    def close(self) -> None:
        """Answer the requests already queued, then stop the worker."""
        self._batcher.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ internals
    def _admit(self, name: str | None) -> Assignment:
        """Resolve a rollout, check the adapters are servable and count the request in flight for them."""
        assignment = self.traffic.assign(name)
        with self._state:
            usable = [n for n in (assignment.adapter, assignment.shadow)
                      if n in (None, BASE_SHADOW) or (n in self._adapters and n not in self._pending)]
            if assignment.adapter not in usable and assignment.adapter is not None:
                state = "is being loaded or unloaded" if assignment.adapter in self._pending else "is not loaded"
                raise UnknownAdapter(f"adapter {assignment.adapter!r} {state} (loaded: {self._loaded_names()}; "
                                     f"rollouts: {sorted(self.traffic.rollouts)})")
            if assignment.shadow is not None and assignment.shadow not in usable:
                assignment = Assignment(assignment.adapter, assignment.rollout)
            self._inflight.update(assignment.counted())
        return assignment

    def _release(self, assignment: Assignment) -> None:
        with self._state:
            self._inflight.subtract(assignment.counted())
            self._state.notify_all()

    def _run_batch(self, jobs: list[Job]) -> None:
        """One forward for every job of the batch (all of one modality, shadow copies appended), then each job's
        answer."""
        started = time.perf_counter()
        shadowed = [i for i, j in enumerate(jobs) if j.shadow is not None]
        inputs = [j.inputs for j in jobs] + [jobs[i].inputs for i in shadowed]
        names = [j.adapter for j in jobs] + [shadow_route(jobs[i].shadow) for i in shadowed]
        with self._state:
            records = {n: self._adapters[n] for n in names if n is not None}  # in flight: none can go away
        with self._model_lock:
            logits, features = self._forward(jobs[0].modality, inputs, names)  # N + S rows each
        m = self.metrics
        m.forward.observe(time.perf_counter() - started)
        m.batch_size.observe(len(names))
        shadow_top1: dict[int, str | None] = {}  # job -> its shadow's top-1 label, for feedback
        for k, i in enumerate(shadowed):  # before the answers: whoever has an answer finds its shadow run counted
            s = len(jobs) + k
            try:
                drift, shadow_top1[i] = record_shadow(m, jobs[i], (logits[i], features[i]), (logits[s], features[s]),
                                                      records, self.base_classes)
                self.health.record_drift(jobs[i].rollout, drift)
            except Exception:  # a shadow never changes an answer, not even by failing
                logger.exception("recording a shadow run of adapter %r (rollout %r) failed", jobs[i].shadow,
                                 jobs[i].rollout)
        for i, job in enumerate(jobs):
            record = records.get(job.adapter)
            classes = (record.classes if record else self.base_classes) if logits[i] is not None else None
            output = Output(logits[i], features[i], job.adapter, record.digest if record else None, job.rollout,
                            classes, started - job.enqueued, record.tagger if record else None, job.request_id)
            self.feedback.remember(output, job.shadow if i in shadow_top1 else None, shadow_top1.get(i))
            m.queue_wait.observe(output.queue_wait_s)
            m.samples.labels(job.adapter or NO_ADAPTER, "primary").inc()
            job.future.set_result(output)

    def _forward(self, modality: str, inputs: list[torch.Tensor], names: list[str | None]
                 ) -> tuple[Sequence[torch.Tensor | None], torch.Tensor]:
        """(logits of each sample, pooled features (N, width)) of one routed forward over `inputs` (pixels of the
        classifier); the features are captured at the head's input."""
        same = len({tuple(t.shape) for t in inputs}) == 1
        place = self.placement  # (N, 3, H, W), or images of their own sizes (tiled bases), on the device
        pixels = place.batch(inputs) if same else [place.inputs(t) for t in inputs]
        captured: list[torch.Tensor] = []
        head = self.model.base_model.get_submodule(self.head_path)
        handle = head.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
        try:
            with torch.inference_mode():
                logits = self._logits(pixels, names)
        finally:
            handle.remove()
        return logits.float().cpu(), captured[-1].float().cpu()

    def _logits(self, pixels: torch.Tensor, names: list[str | None]) -> torch.Tensor:
        return self.model(pixels, adapters=names)  # (N, classes): every sample with its own adapter, one pass

    @property
    def base_classes(self) -> tuple[str, ...] | None:
        """Names of the base head's outputs, if the config gave them."""
        return tuple(self.base.classes) if self.base.classes else None

    def _classes(self, source: AdapterSource | None) -> tuple[str, ...]:
        """An adapter's class names: its task.json's, else the base's, else the output indices."""
        classes = (source.classes if source else None) or self.base.classes
        if classes is None:
            return tuple(str(i) for i in range(self.base.num_classes))
        if len(classes) != self.base.num_classes:
            raise ConfigError(f"{len(classes)} class names for a head of {self.base.num_classes} outputs")
        return tuple(classes)

    def _prepare(self) -> None:
        """Called once the engine is set up, before the batch worker starts."""

    def _place_adapter(self, name: str) -> None:
        """Adapter `name`'s tensors on the engine's device in its dtype (the model lock is held). Loaded adapters
        are built in float32 under a half-precision base (as for training); served, they take the base's dtype
        so every routed adapter computes alike."""
        for module in (*self.model.layers_of(name).values(), *self.model.saved_modules(name).values()):
            module.to(device=self.placement.device, dtype=self.placement.dtype)  # buffers too (PiSSA's residual)

    def _release_team(self) -> None:
        """Free this thread's OpenMP team (vislora.serve.openmp) when the forward runs on the CPU; a GPU
        forward's CPU threads do not compete."""
        if self.placement.is_cpu:
            release_team()

    def _check_fits(self, name: str, source: AdapterSource) -> None:
        """Refuse an adapter trained for another base model (before its files are read)."""
        check_fits(name, source, self.base, self.input_spec)

    def _read(self, source: AdapterSource) -> Any:
        """The adapter's files, read and checked against the model (no model lock held)."""
        return check_adapter(self.model, source.path)

    def _install(self, name: str, checked: Any) -> None:
        """Put what `_read` returned on the model as adapter `name` (the model lock is held)."""
        self.model.install(name, checked, activate=False)

    def _installed(self, name: str, source: AdapterSource) -> None:
        """Called with the model lock held once adapter `name` is on the model, before any request can use it."""

    def _removed(self, name: str) -> None:
        """Called with the model lock held once adapter `name` is off the model."""

    def _bytes(self, name: str) -> int:
        return sum(t.numel() * t.element_size() for t in self.model.adapter_state(name).values())

    def _register(self, name: str, record: LoadedAdapter) -> None:
        with self._state:
            self._adapters[name] = record
            sizes = {n: a.bytes for n, a in self._adapters.items()}
        self.metrics.loaded(sizes, changed=(name,))

    def _check_free(self, name: str) -> None:
        if name in self._adapters or name in self._pending:
            raise Conflict(f"an adapter named {name!r} is already loaded (or loading); unload it first or pick "
                           "another name")
        if name in self.traffic.rollouts:
            raise Conflict(f"{name!r} is a rollout's name; an adapter needs a name of its own")

    def _loaded_names(self) -> list[str]:
        return sorted(n for n in self._adapters if n not in self._pending)
