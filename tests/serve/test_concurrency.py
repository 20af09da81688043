"""Hot load/unload while clients stream requests to a real uvicorn server: every answer is the offline output of
the adapter file that computed it, and no request gets a 5xx."""

import random
import threading
from collections import Counter

import httpx
import pytest
import torch
from serving import build_served, live_server, make_engine, serve_config

from vislora.serve import create_app

ADMIN = {"Authorization": "Bearer admin-secret"}
CLIENTS = 4
REQUESTS_PER_CLIENT = 40
TOGGLED = ("t", "a2")  # "t" is reloaded from a3's and a4's files in turn; a2 comes and goes


@pytest.fixture
def served(tmp_path_factory):
    return build_served(tmp_path_factory)


def check_answer(body, endpoint, image, refs_by_digest, served):
    """The answer equals the offline output of the adapter file (digest) that computed it."""
    ref = served["refs"][None] if body["adapter"] is None else refs_by_digest[body["digest"]]
    if endpoint == "embed":
        assert torch.allclose(torch.tensor(body["embedding"]), ref.features[image], atol=1e-5, rtol=0)
        return
    probs = torch.softmax(ref.logits[image].double(), dim=-1)
    assert [label["index"] for label in body["labels"]] == probs.argsort(descending=True).tolist()
    for label in body["labels"]:
        assert abs(label["score"] - probs[label["index"]].item()) < 1e-5


def client_stream(url, seed, results):
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=60) as http:
        for _ in range(REQUESTS_PER_CLIENT):
            image = rng.randrange(8)
            adapter = rng.choice(["a0", "a1", *TOGGLED, None])
            endpoint = "embed" if adapter is None or rng.random() < 0.3 else "predict"
            data = {"adapter": adapter} if adapter else {}
            response = http.post(f"/v1/{endpoint}", files={"image": ("x.png", results["images"][image])}, data=data)
            results["answers"].append((adapter, endpoint, image, response.status_code, response.json()))


def admin_loop(url, served, done, log):
    """Load and unload the toggled adapters over and over until the clients are done (bounded count)."""
    with httpx.Client(base_url=url, timeout=60, headers=ADMIN) as http:
        for cycle in range(200):
            if done.is_set():
                return
            source = "a3" if cycle % 2 == 0 else "a4"
            for name, folder in (("t", served["dirs"][source]), ("a2", served["dirs"]["a2"])):
                response = http.post("/v1/adapters", json={"name": name, "path": str(folder)})
                log.append(("load", name, response.status_code))
            for name in TOGGLED:
                log.append(("unload", name, http.delete(f"/v1/adapters/{name}").status_code))


def test_load_unload_during_a_request_stream_never_mixes_adapters(served):
    fields = {"auth": {"admin_token": "admin-secret"}, "batching": {"max_wait_ms": 3, "max_batch_size": 16}}
    engine = make_engine(served, names=("a0", "a1"), **fields)
    refs_by_digest = {}
    for name in ("a0", "a1", "a2", "a3", "a4"):
        from vislora.serve.sources import open_source

        refs_by_digest[open_source(served["dirs"][name]).digest] = served["refs"][name]
    results = {"images": served["images"], "answers": []}
    done, log = threading.Event(), []
    with live_server(create_app(engine, serve_config(served, names=("a0", "a1"), **fields))) as url:
        admin = threading.Thread(target=admin_loop, args=(url, served, done, log))
        clients = [threading.Thread(target=client_stream, args=(url, seed, results)) for seed in range(CLIENTS)]
        admin.start()
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(300)
        done.set()
        admin.join(120)
    answers = results["answers"]
    assert len(answers) == CLIENTS * REQUESTS_PER_CLIENT
    statuses = Counter(status for *_, status, _ in answers)
    assert not [a for a in answers if a[3] >= 500], statuses
    for adapter, endpoint, image, status, body in answers:
        if status == 404:
            assert adapter in TOGGLED, body  # only adapters that come and go may be missing
            continue
        assert status == 200, body
        check_answer(body, endpoint, image, refs_by_digest, served)
    served_toggled = Counter(body["digest"] for adapter, *_, status, body in answers
                             if adapter == "t" and status == 200)
    assert sum(served_toggled.values()) > 0, "no request met a hot-loaded adapter: the test exercised nothing"
    assert {status for *_, status in log} <= {201, 204}, Counter(log)
    assert sum(1 for kind, _, _ in log if kind == "load") >= 2
