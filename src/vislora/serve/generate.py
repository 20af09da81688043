"""GenerativeEngine: serves a generative VLM (POST /v1/generate): text from an image and a prompt, each request with
its own adapter, the requests that arrive together generated in ONE routed `generate` call.

Requests queue on the Engine's micro-batcher. A batch holds requests of one decoding setting (greedy, or sampling
at one temperature: the batcher's modality key), so one `model.generate(..., adapters=[...])` serves it: prompts
left-padded (`VlmProcessor.prompt_batch`), every prompt keeping its adapter through every decode step. Requests
asking for different `max_new_tokens` share a batch: it generates the most any of them asks for and each answer is
cut at its own limit, so a greedy answer equals generating that request alone. A sampled request with a `seed`, and
a streamed request (one event per token), run alone: the draw, or the stream, is theirs only.

Adapters load and unload as on the classifier engine (admin routes). An adapter made for another language model
(task.json `vlm.lm_identity`, see vislora.vlm.check_lm_identity) is refused naming what differs; a captioning
adapter's task.json `prompt` is the prompt of its requests that send none.

    engine = GenerativeEngine.of(build_vlm("asset:dinov2-small", lm="asset:smollm2-135m-instruct", image_size=56))
    engine.load("retail", "runs/retail-vqa/adapter")
    engine.generate("shoe.png", "What is this item?", adapter="retail").text
"""

from __future__ import annotations

import contextlib
import queue
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from vislora.data.transforms import InputSpec
from vislora.errors import AdapterFileError, BadImage, ServeError
from vislora.model import AdaptedModel
from vislora.runs import GENERATIVE_TASKS
from vislora.serve.batcher import Job
from vislora.serve.calls import ImageInput
from vislora.serve.config import BaseSection, BatchingSection, GenerateSection
from vislora.serve.engine import Engine
from vislora.serve.metrics import NO_ADAPTER
from vislora.serve.records import LoadedAdapter
from vislora.serve.sources import AdapterSource
from vislora.vlm import Vlm, VlmProcessor, check_lm_identity, lm_identity

GENERATE = "generate"  # the batcher modality of greedy requests; sampled ones add their temperature


@dataclass(frozen=True)
class Generated:
    """One answer of the generative engine."""

    text: str
    adapter: str | None
    digest: str | None  # sha256 (16 hex) of the adapter's weights file
    rollout: str | None
    tokens: int  # new tokens, the end-of-answer token included
    prompt_tokens: int  # the prompt's tokens, image tokens included
    seconds: float  # from queued to answered
    finish_reason: str  # "stop": the model ended the answer; "length": max_new_tokens was reached
    batch_size: int  # requests generated together with this one (itself included)
    token_ids: tuple[int, ...] = ()  # the new tokens, the end-of-answer token included

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class GenerateJob(Job):
    """A generate request waiting for its batch: pixels in `inputs`, the prompt and decoding options."""

    question: str = ""
    prompt_tokens: int = 0
    max_new_tokens: int = 1
    temperature: float = 0.0  # 0: greedy
    seed: int | None = None
    stream: TokenStream | None = None


class TokenStream:
    """The streamer of one streamed request: `generate` calls `put` with the prompt, then with each new token, then
    `end`; a reader on another thread takes (token id, its text) pairs with `get` until it returns None.

    A token's text is what it adds to the decoded answer (special tokens skipped); a token ending inside a
    multi-byte character adds "" and its text comes with the next one."""

    def __init__(self, processor: VlmProcessor) -> None:
        self.processor = processor
        self._queue: queue.Queue[tuple[int, str] | None] = queue.Queue()
        self._seen_prompt = False
        self._ids: list[int] = []
        self._text = ""

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        for token in value.reshape(-1).tolist():
            self._ids.append(int(token))
            text = self.processor.tokenizer.decode(self._ids, skip_special_tokens=True)
            delta = "" if text.endswith("\ufffd") else text[len(self._text):]
            self._text = self._text if text.endswith("\ufffd") else text
            self._queue.put((int(token), delta))

    def end(self) -> None:
        self._queue.put(None)

    def get(self, timeout: float) -> tuple[int, str] | None:
        """The next (token, text), None once generation ended; queue.Empty when nothing came within `timeout` s."""
        return self._queue.get(timeout=timeout)


class GenerativeEngine(Engine):
    """An `Engine` over a generative VLM: `generate` (POST /v1/generate); predict and embed are refused."""

    def __init__(self, model: AdaptedModel, head_path: str | None, input_spec: InputSpec, base: BaseSection, *,
                 vlm: Vlm, generate: GenerateSection | None = None, batching: BatchingSection | None = None,
                 **options: Any) -> None:
        self.processor = vlm.processor
        self.generate_limits = generate or GenerateSection()
        self._identity = lm_identity(model)  # the served LM, that adapters' task.json is checked against
        self._prompts: dict[str, str] = {}  # captioning adapter -> its task.json prompt
        batching = batching or BatchingSection()
        if self.generate_limits.max_wait_ms is not None:
            batching = batching.model_copy(update={"max_wait_ms": self.generate_limits.max_wait_ms})
        super().__init__(model, head_path, input_spec, base, batching=batching, **options)

    @classmethod
    def of(cls, vlm: Vlm, base: BaseSection | None = None, **options: Any) -> GenerativeEngine:
        """The engine of a VLM built in Python (its model may carry adapters already: they are served as they
        are); `options` as Engine's, plus `generate` (a GenerateSection)."""
        model = vlm.model if isinstance(vlm.model, AdaptedModel) else AdaptedModel(vlm.model)
        record = vlm.record
        base = base or BaseSection(kind="generative", spec=str(record.get("spec", "(in memory)")),
                                   lm=record.get("lm"), image_size=vlm.image_spec.size)
        return cls(model, None, vlm.image_spec, base, vlm=vlm, **options)

    # ------------------------------------------------------------ requests
    def generate(self, image: ImageInput, prompt: str | None = None, adapter: str | None = None, *,
                 max_new_tokens: int | None = None, temperature: float = 0.0, seed: int | None = None) -> Generated:
        """The answer to `prompt` about `image` under `adapter` (None: the base model; a captioning adapter's own
        prompt when `prompt` is None); calls from several threads share batches."""
        return self.submit_generate(self.preprocess(image), prompt, adapter, max_new_tokens=max_new_tokens,
                                    temperature=temperature, seed=seed).result()

    def token_stream(self) -> TokenStream:
        """A stream to pass to `submit_generate(stream=...)`: the request then runs alone, token by token."""
        return TokenStream(self.processor)

    def submit_generate(self, pixels: torch.Tensor, prompt: str | None = None, adapter: str | None = None, *,
                        max_new_tokens: int | None = None, temperature: float = 0.0, seed: int | None = None,
                        stream: TokenStream | None = None) -> Future[Generated]:
        """Queue one generate request (pixels from `preprocess`); ServeError (400) naming the limit for a prompt or
        max_new_tokens over the server's, an empty prompt or a bad temperature; UnknownAdapter (404)."""
        limits = self.generate_limits
        new = limits.default_max_new_tokens if max_new_tokens is None else max_new_tokens
        if not 1 <= new <= limits.max_new_tokens:
            raise ServeError(f"max_new_tokens={new} is outside the server's limit of 1 to {limits.max_new_tokens} "
                             "(generate.max_new_tokens); ask for fewer tokens or raise the limit")
        if not 0 <= temperature <= limits.max_temperature:
            raise ServeError(f"temperature={temperature} is outside 0 (greedy) to {limits.max_temperature} "
                             "(generate.max_temperature)")
        self._check_pixels(pixels)
        assignment = self._admit(adapter)
        try:
            question = self._question(prompt, assignment.adapter)
            prompt_tokens = len(self.processor.prompt_ids(question))  # DataError (400) over the model's max_length
            if prompt_tokens > limits.max_prompt_tokens:
                raise ServeError(f"the prompt is {prompt_tokens} tokens (image tokens and chat template included), "
                                 f"over the server's limit of {limits.max_prompt_tokens} (generate.max_prompt_tokens); "
                                 "shorten the prompt")
        except BaseException:
            self._release(assignment)
            raise
        key = GENERATE if temperature == 0 else f"{GENERATE}:temperature={temperature!r}"
        if stream is not None or (temperature > 0 and seed is not None):
            key = f"{key}:alone:{uuid.uuid4().hex}"  # a batch of its own
        job = GenerateJob(pixels, assignment.adapter, None, assignment.rollout, key, question=question,
                          prompt_tokens=prompt_tokens, max_new_tokens=new, temperature=temperature, seed=seed,
                          stream=stream)
        return self._submit_job(job, assignment)

    def submit(self, pixels: torch.Tensor, adapter: str | None = None) -> Future:
        raise self._generates_only()

    def check_predicts(self, adapter: str | None) -> None:
        raise self._generates_only()

    def _generates_only(self) -> ServeError:
        return ServeError(f"this server's base ({self.base.spec}, lm {self.base.lm}) is a generative VLM: it answers "
                          "POST /v1/generate (engine.generate), not predict or embed")

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        size, shape = self.input_spec.size, tuple(pixels.shape)
        if shape != (3, size, size):
            raise BadImage(f"pixels have shape {shape}, expected (3, {size}, {size}); use engine.preprocess()")

    def _question(self, prompt: str | None, adapter: str | None) -> str:
        """The request's prompt, or (None) its captioning adapter's; ServeError for an empty one."""
        if prompt is None and adapter in self._prompts:
            return self._prompts[adapter]
        if prompt is None or not prompt.strip():
            whose = (f"adapter {adapter!r} has no prompt of its own (only captioning adapters' task.json `prompt`)"
                     if adapter else "the base model has no prompt of its own")
            raise ServeError(f"the prompt is {'missing' if prompt is None else 'empty'}; give the question to answer, "
                             f"e.g. 'What is this item?' ({whose})")
        return prompt

    # ------------------------------------------------------------ internals
    def _run_batch(self, jobs: list[Job]) -> None:
        """One routed `generate` for every job of the batch (one decoding setting), then each job's answer."""
        started = time.perf_counter()
        batch: list[GenerateJob] = jobs  # type: ignore[assignment]  # this engine queues GenerateJobs only
        first, names = batch[0], [job.adapter for job in batch]
        prompts = self.processor.prompt_batch([job.question for job in batch])  # left-padded (N, width)
        with self._state:
            records = {n: self._adapters[n] for n in names if n is not None}  # in flight: none can go away
        try:
            with self._model_lock, self._seeded(first.seed), torch.inference_mode():
                out = self.model.generate(
                    input_ids=self.placement.inputs(prompts["input_ids"]),
                    attention_mask=self.placement.inputs(prompts["attention_mask"]),
                    pixel_values=self.placement.batch([job.inputs for job in batch]),  # (N, 3, size, size)
                    adapters=names, max_new_tokens=max(job.max_new_tokens for job in batch), streamer=first.stream,
                    **self._decoding(first.temperature), **self.processor.generation_kwargs())
        finally:
            if first.stream is not None:
                first.stream.end()
        seconds = time.perf_counter() - started
        new = out[:, prompts["input_ids"].shape[1]:].cpu()  # (N, generated): the prompts come first
        answers = [self._answer(job, new[i], records.get(job.adapter), len(batch)) for i, job in enumerate(batch)]
        m = self.metrics
        m.generate_seconds.observe(seconds)
        m.batch_size.observe(len(batch))
        m.generate_tokens_per_s.set(sum(a.tokens for a in answers) / seconds if seconds > 0 else 0.0)
        for job, answer in zip(batch, answers, strict=True):
            m.queue_wait.observe(started - job.enqueued)
            m.samples.labels(job.adapter or NO_ADAPTER, "primary").inc()
            m.generated_tokens.labels(job.adapter or NO_ADAPTER).inc(answer.tokens)
            job.future.set_result(answer)

    def _answer(self, job: GenerateJob, row: torch.Tensor, record: LoadedAdapter | None, batch_size: int
                ) -> Generated:
        """A job's answer from its row of new tokens, cut at its own max_new_tokens and after the end token."""
        tokens = row[:job.max_new_tokens].tolist()
        end = self.processor.eos_token_id
        stopped = end in tokens
        tokens = tokens[:tokens.index(end) + 1] if stopped else tokens
        text = self.processor.decode(torch.tensor([tokens], dtype=torch.long), 0)[0]
        return Generated(text, job.adapter, record.digest if record else None, job.rollout, len(tokens),
                         job.prompt_tokens, time.perf_counter() - job.enqueued, "stop" if stopped else "length",
                         batch_size, tuple(tokens))

    @staticmethod
    def _decoding(temperature: float) -> dict[str, Any]:
        if temperature == 0:
            return {"do_sample": False, "num_beams": 1}
        return {"do_sample": True, "temperature": temperature}

    @contextlib.contextmanager
    def _seeded(self, seed: int | None) -> Iterator[None]:
        """Inside the block, sampling draws from `seed` (when given); the global random state is left as it was."""
        if seed is None:
            yield
            return
        with torch.random.fork_rng(devices=[self.placement.device] if self.placement.is_cuda else []):
            torch.manual_seed(seed)
            yield

    def _check_fits(self, name: str, source: AdapterSource) -> None:
        """Refuse an adapter of another task, or made for another language model (naming what differs)."""
        task = source.task
        if task is None:
            return  # a bare adapter directory: check_adapter checks its shapes against the model
        if task.get("task") not in GENERATIVE_TASKS:
            raise AdapterFileError(f"adapter {name!r} ({source.path}) is a {task.get('task', 'classification')!r} "
                                   f"adapter, but this server serves a generative VLM ({', '.join(GENERATIVE_TASKS)} "
                                   "adapters); serve it from a server built on its base")
        check_lm_identity((task.get("vlm") or {}).get("lm_identity"), self._identity, f"adapter {name!r} "
                          f"({source.path})")

    def _installed(self, name: str, source: AdapterSource) -> None:
        prompt = (source.task or {}).get("prompt")
        if prompt:
            self._prompts[name] = str(prompt)

    def _removed(self, name: str) -> None:
        self._prompts.pop(name, None)

    def _classes(self, source: AdapterSource | None) -> tuple[str, ...]:
        return ()
