"""POST /v1/generate on the GenerativeEngine: requests with different adapters generated together in one routed
`generate` call, each answer equal to generating that request alone with its adapter (greedy, token for token);
limits answered 400 naming them; token metrics; server-sent events; adapters for another LM refused."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests.vlm.generative_fixtures import randomize_adapter, tiny_llava

from vislora import inject
from vislora.data.transforms import build_transform
from vislora.errors import AdapterFileError, ServeError, UnknownAdapter
from vislora.formats import load_adapter, save_adapter
from vislora.serve import GenerativeEngine, ServeConfig, create_app
from vislora.serve.config import BaseSection, BatchingSection, GenerateSection
from vislora.serve.sources import generative_base
from vislora.vlm import vlm_adapter_config

CAPTION = "describe the image briefly ."
ADMIN = "secret-admin"
TARGETS = {"a": ["lm"], "b": ["lm", "vision"], "c": ["lm:q", "lm:v", "connector"]}


def png(seed: int, size: int = 36) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_adapters(root: Path, vlm, names=("a", "b", "c"), seed: int = 0) -> dict[str, Path]:
    """Adapters with random (nonzero) weights saved with a task.json as training writes it: `c` is a captioning
    adapter with its own prompt, the others VQA adapters."""
    model = inject(vlm.model, vlm_adapter_config(vlm.model, TARGETS[names[0]], rank=4, alpha=8), names[0])
    for name in names[1:]:
        model.add_adapter(name, vlm_adapter_config(vlm.model, TARGETS[name], rank=2, alpha=4))
    dirs = {}
    try:
        for i, name in enumerate(names):
            randomize_adapter(model, name, seed + i)
            dirs[name] = root / name
            save_adapter(model, dirs[name], name)
            task = {"task": "captioning", "prompt": CAPTION} if name == "c" else {"task": "vqa"}
            (dirs[name] / "task.json").write_text(json.dumps({**task, "vlm": vlm.record}))
    finally:
        model.unload(merge=False)
    return dirs


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    dirs = write_adapters(root, tiny_llava())
    dirs["other"] = write_adapters(root / "other", tiny_llava(seed=5), names=("a",))["a"]  # another LM
    return dirs


@pytest.fixture(scope="module")
def reference(adapters):
    """A separately built model with the adapters loaded from their folders, generating one request at a time."""
    vlm = tiny_llava()
    model = load_adapter(vlm.model, adapters["a"], "a", activate=False)
    for name in ("b", "c"):
        load_adapter(model, adapters[name], name, activate=False)
    transform = build_transform(vlm.image_spec, train=False)

    def alone(image: bytes, question: str, adapter: str | None, max_new_tokens: int) -> list[int]:
        prompt = vlm.processor.prompt_batch([question])
        pixels = transform(Image.open(io.BytesIO(image)).convert("RGB"))[None]
        kwargs = {**vlm.processor.generation_kwargs(), "max_new_tokens": max_new_tokens, "do_sample": False}
        with torch.no_grad():
            if adapter is None:
                with model.disabled():
                    out = model.generate(**prompt, pixel_values=pixels, **kwargs)
            else:
                model.set_active(adapter)
                out = model.generate(**prompt, pixel_values=pixels, **kwargs)
        tokens = out[0, prompt["input_ids"].shape[1]:].tolist()
        end = vlm.processor.eos_token_id
        return tokens[:tokens.index(end) + 1] if end in tokens else tokens

    return alone


@pytest.fixture(scope="module")
def engine(adapters):
    """Batches close at 4 requests or 300 ms after their first: requests submitted together meet in one batch."""
    limits = GenerateSection(max_prompt_tokens=60, max_new_tokens=8, default_max_new_tokens=4, max_wait_ms=300)
    engine = GenerativeEngine.of(tiny_llava(), generate=limits, batching=BatchingSection(max_batch_size=4))
    for name in ("a", "b", "c"):
        engine.load(name, adapters[name])
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def client(engine):
    from fastapi.testclient import TestClient

    config = ServeConfig.parse({"base": engine.base.model_dump(), "auth": {"admin_token": ADMIN},
                                "expose": {"metrics": "open"}})
    with TestClient(create_app(engine, config, close_engine=False)) as client:
        yield client


REQUESTS = [  # (image seed, prompt, adapter, max_new_tokens): different limits share the batch
    (1, "what is this item ?", "a", 6),
    (2, "is it worn on the feet ?", "b", 3),
    (3, None, "c", 5),  # the captioning adapter's own prompt
    (4, "what color is it ?", None, 4),  # the base model
]


def submit_together(engine):
    pixels = [engine.preprocess(png(seed)) for seed, *_ in REQUESTS]  # first, so the submits follow each other
    return [engine.submit_generate(p, prompt, adapter, max_new_tokens=n)
            for p, (_, prompt, adapter, n) in zip(pixels, REQUESTS, strict=True)]


def test_concurrent_requests_share_one_generate_and_equal_each_alone(engine, reference):
    before = engine.metrics.batch_size.collect()[0].samples
    count = next(s.value for s in before if s.name == "vislora_batch_size_count")
    answers = [f.result(timeout=60) for f in submit_together(engine)]
    assert [a.batch_size for a in answers] == [4] * 4
    after = engine.metrics.batch_size.collect()[0].samples
    assert next(s.value for s in after if s.name == "vislora_batch_size_count") == count + 1  # ONE generate call
    for (seed, prompt, adapter, n), answer in zip(REQUESTS, answers, strict=True):
        expected = reference(png(seed), prompt or CAPTION, adapter, n)
        assert list(answer.token_ids) == expected, (adapter, answer.token_ids, expected)
        assert answer.tokens == len(expected) <= n
        assert answer.finish_reason == ("stop" if expected[-1] == engine.processor.eos_token_id else "length")
        assert answer.adapter == adapter and answer.tokens_per_s > 0
    assert len({a.token_ids for a in answers}) >= 3  # the adapters differ, so a routing mistake would show


def test_seeded_sampling_runs_alone_and_repeats(engine):
    first = engine.generate(png(5), "what is it ?", "b", max_new_tokens=6, temperature=1.5, seed=7)
    again = engine.generate(png(5), "what is it ?", "b", max_new_tokens=6, temperature=1.5, seed=7)
    assert first.batch_size == again.batch_size == 1
    assert first.token_ids == again.token_ids


def test_limits_and_refusals_name_the_problem(engine, adapters):
    pixels = engine.preprocess(png(1))
    with pytest.raises(ServeError, match=r"limit of 1 to 8 \(generate.max_new_tokens\)"):
        engine.submit_generate(pixels, "what is it ?", "a", max_new_tokens=9)
    with pytest.raises(ServeError, match=r"over the server's limit of 60 \(generate.max_prompt_tokens\)"):
        engine.submit_generate(pixels, "what is it ? " * 20, "a")
    with pytest.raises(ServeError, match="prompt is empty"):
        engine.submit_generate(pixels, "   ", "a")
    with pytest.raises(ServeError, match=r"prompt is missing.*adapter 'a' has no prompt of its own"):
        engine.submit_generate(pixels, None, "a")
    with pytest.raises(UnknownAdapter, match="'zzz' is not loaded"):
        engine.submit_generate(pixels, "what is it ?", "zzz")
    with pytest.raises(ServeError, match="generative VLM: it answers POST /v1/generate"):
        engine.predict(png(1), "a")
    with pytest.raises(AdapterFileError, match=r"another language model \(.*embeddings_sha256"):
        engine.load("other", adapters["other"])
    assert engine.in_flight("a") == 0  # refused requests were released


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_http_generate_json_and_multipart(client, engine):
    expected = engine.generate(png(2), "is it worn on the feet ?", "b", max_new_tokens=3)
    answer = client.post("/v1/generate", json={"image": b64(png(2)), "prompt": "is it worn on the feet ?",
                                               "adapter": "b", "max_new_tokens": 3})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["text"] == expected.text and body["tokens"] == expected.tokens and body["adapter"] == "b"
    assert body["tokens_per_s"] > 0 and body["prompt_tokens"] == expected.prompt_tokens
    form = client.post("/v1/generate", files={"image": ("x.png", png(3), "image/png")},
                       data={"adapter": "c", "max_new_tokens": "4"})  # no prompt: the captioning adapter's own
    assert form.status_code == 200, form.text
    assert form.json()["text"] == engine.generate(png(3), CAPTION, "c", max_new_tokens=4).text


@pytest.mark.parametrize(("fields", "status", "pattern"), [
    ({"prompt": "what is it ? " * 20, "adapter": "a"}, 400, r"limit of 60 \(generate.max_prompt_tokens\)"),
    ({"prompt": "what is it ?", "adapter": "a", "max_new_tokens": 50}, 400, r"1 to 8 \(generate.max_new_tokens\)"),
    ({"prompt": "", "adapter": "a"}, 400, "prompt is empty"),
    ({"prompt": "what is it ?", "adapter": "nope"}, 404, "'nope' is not loaded"),
    ({"prompt": "what is it ?", "image": b64(b"not an image at all")}, 400, "could not decode the upload"),
    ({"prompt": "what is it ?", "image": "%%%"}, 400, "not valid base64"),
])
def test_http_errors_name_the_limit_or_problem(client, fields, status, pattern):
    answer = client.post("/v1/generate", json={"image": b64(png(1)), **fields})
    assert answer.status_code == status, answer.text
    assert re.search(pattern, answer.json()["detail"]), answer.json()


def test_http_missing_image_and_adapter_for_another_lm(client, adapters):
    missing = client.post("/v1/generate", data={"prompt": "what is it ?"},
                          files={"other": ("x.txt", b"x", "text/plain")})
    assert missing.status_code == 400 and "file field named 'image'" in missing.json()["detail"]
    loaded = client.post("/v1/adapters", json={"name": "other", "path": str(adapters["other"])},
                         headers={"Authorization": f"Bearer {ADMIN}"})
    assert loaded.status_code == 400, loaded.text
    assert re.search(r"made for another language model.*embeddings_sha256", loaded.json()["detail"])


def test_http_stream_yields_the_same_text_token_by_token(client):
    fields = {"image": b64(png(4)), "prompt": "what color is it ?", "adapter": "a", "max_new_tokens": 5}
    plain = client.post("/v1/generate", json=fields).json()
    with client.stream("POST", "/v1/generate", json={**fields, "stream": True}) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        raw = "".join(answer.iter_text())
    events = [(m[0], json.loads(m[1])) for m in re.findall(r"event: (\w+)\ndata: (.*)\n\n", raw)]
    tokens = [data for kind, data in events if kind == "token"]
    assert events[-1][0] == "done"
    done = events[-1][1]
    assert len(tokens) == done["tokens"] == plain["tokens"]
    assert "".join(t["text"] for t in tokens).strip() == done["text"] == plain["text"]
    assert done["batch_size"] == 1


def test_metrics_count_generated_tokens_per_adapter(client, engine):
    def counted() -> dict[str, float]:
        text = client.get("/metrics").text
        return {m[0]: float(m[1]) for m in re.findall(r'vislora_generated_tokens_total\{adapter="(\w+)"\} (\S+)', text)}

    before = counted()
    answers = [f.result(timeout=60) for f in submit_together(engine)]
    after = counted()
    for name in ("a", "b", "c", "none"):
        made = sum(a.tokens for a in answers if (a.adapter or "none") == name)
        assert after[name] - before.get(name, 0.0) == made
    text = client.get("/metrics").text
    assert "vislora_generate_tokens_per_second" in text and "vislora_generate_seconds_count" in text
    stats = client.get("/v1/stats").json()["generate"]
    assert stats["tokens"] == sum(after.values()) and stats["tokens_per_s"] > 0


def test_predict_and_embed_on_a_generative_base_name_generate(client):
    answer = client.post("/v1/predict", json={"image": b64(png(1)), "adapter": "a"})
    assert answer.status_code == 400 and "POST /v1/generate" in answer.json()["detail"]
    embedded = client.post("/v1/embed", json={"image": b64(png(1))})
    assert embedded.status_code == 400 and "POST /v1/generate" in embedded.json()["detail"]


def test_base_from_a_generative_task_json(adapters):
    task = json.loads((adapters["a"] / "task.json").read_text())
    task["vlm"] = {**task["vlm"], "spec": "asset:dinov2-small", "lm": "asset:smollm2-135m-instruct",
                   "image_size": 56, "seed": 0, "max_length": 512}
    base = generative_base(task)
    assert base == BaseSection(kind="generative", spec="asset:dinov2-small", lm="asset:smollm2-135m-instruct",
                               image_size=56, kwargs={"seed": 0, "max_length": 512})
    with pytest.raises(Exception, match="set kind: generative too"):
        BaseSection(spec="asset:dinov2-small", lm="asset:smollm2-135m-instruct", num_classes=3)


def test_cli_flags_describe_a_generative_base():
    from vislora.cli.serve import build_config
    from vislora.errors import ConfigError

    config = build_config(None, [], "asset:dinov2-small", None, 56, False, None, None,
                          ["generate.max_new_tokens=32"], lm="asset:smollm2-135m-instruct")
    assert config.base.kind == "generative" and config.base.lm == "asset:smollm2-135m-instruct"
    assert config.base.image_size == 56 and config.generate.max_new_tokens == 32
    with pytest.raises(ConfigError, match="give --base too"):
        build_config(None, ["a=/tmp/x"], None, None, None, False, None, None, [], lm="asset:smollm2-135m-instruct")


def test_real_server_batches_concurrent_http_requests_of_three_adapters_and_the_base(adapters, reference):
    """Four clients at once against uvicorn: one batch (it closes at 4 requests; the window is long), each answer
    the text its request gives alone."""
    import threading

    import httpx
    from serving import live_server

    limits = GenerateSection(max_new_tokens=8, max_wait_ms=20_000)
    engine = GenerativeEngine.of(tiny_llava(), generate=limits, batching=BatchingSection(max_batch_size=4))
    for name in ("a", "b", "c"):
        engine.load(name, adapters[name])
    answers: dict[int, dict] = {}

    def ask(i: int, url: str) -> None:
        seed, prompt, adapter, n = REQUESTS[i]
        fields = {"image": b64(png(seed)), "adapter": adapter, "max_new_tokens": n,
                  **({"prompt": prompt} if prompt else {})}
        answers[i] = httpx.post(f"{url}/v1/generate", json=fields, timeout=60).json()

    try:
        with live_server(create_app(engine, close_engine=False)) as url:
            threads = [threading.Thread(target=ask, args=(i, url)) for i in range(len(REQUESTS))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(90)
    finally:
        engine.close()
    assert [answers[i]["batch_size"] for i in range(4)] == [4] * 4, answers
    for i, (seed, prompt, adapter, n) in enumerate(REQUESTS):
        expected = reference(png(seed), prompt or CAPTION, adapter, n)
        assert answers[i]["text"] == engine.processor.decode(torch.tensor([expected]), 0)[0]
        assert answers[i]["tokens"] == len(expected) and answers[i]["adapter"] == adapter
