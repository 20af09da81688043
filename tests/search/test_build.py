"""Indexes built from tiny trained runs: an image finds itself first, texts search a dual encoder's index and are
refused on a classifier's, a query embedded by another adapter version (or the base model) is refused, the CLI."""

import json

import pytest
import torch
from PIL import Image
from search_fixtures import build_runs
from typer.testing import CliRunner

from multilabel_run import train_tiny_multilabel
from vislora.cli import app
from vislora.data import MultiLabelFormat, manifest
from vislora.errors import SearchError, StaleIndex
from vislora.evaluate.collect import classifier_parts
from vislora.registry import Registry
from vislora.runs import load_trained, load_trained_dual
from vislora.search import (
    Embedder,
    build_index,
    load_index,
    open_query,
    query,
    read_header,
    rows_with,
    text_recall,
)
from vislora.search.embed import AdapterIdentity

runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return build_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def indexes(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("indexes")
    built = {name: build_index(runs["images"], runs[name], root / name, batch_size=5)
             for name in ("classifier", "dual")}
    built["dual_base"] = build_index(runs["images"], runs["dual"], root / "dual_base", base=True, batch_size=5)
    return {name: report.path for name, report in built.items()}


def images(runs):
    return sorted(runs["images"].rglob("*.png"))


@pytest.mark.parametrize("name", ["classifier", "dual", "dual_base"])
def test_every_indexed_image_finds_itself_first(runs, indexes, name):
    index, embedder = open_query(indexes[name])
    assert index.count == 12 and index.backend == "faiss"
    for path in images(runs):
        hits = query(index, image=path, k=3, embedder=embedder)
        assert hits[0].path == str(path) and hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert hits[0].label == path.parent.name and [h.rank for h in hits] == [1, 2, 3]


def test_the_index_holds_what_evaluation_embeds(runs, indexes):
    """Classifier rows are the pooled features its head reads; dual rows the joint-space image embeddings (adapter
    on; off for the base index); each from the run's evaluation transform."""
    path = images(runs)[4]
    model, _ = load_trained(runs["classifier"])
    pixels = Embedder.open(runs["classifier"]).transform(Image.open(path).convert("RGB"))[None]
    with torch.no_grad():
        features = classifier_parts(model.base_model)[0](pixels)
    index = load_index(indexes["classifier"])
    row = next(i for i, r in enumerate(index.rows) if r["path"] == str(path))
    assert index.header["embedding"] == "features" and index.dim == features.shape[1]
    assert torch.allclose(torch.from_numpy(index.vectors[row]), torch.nn.functional.normalize(features, dim=-1)[0],
                          atol=1e-5)
    dual, _ = load_trained_dual(runs["dual"])
    pixels = Embedder.open(runs["dual"]).transform(Image.open(path).convert("RGB"))[None]
    with torch.no_grad():
        adapted = dual(images=pixels)[0][0]
        with dual.disabled():
            base = dual(images=pixels)[0][0]
    assert not torch.allclose(adapted, base, atol=1e-3)
    for name, expected in (("dual", adapted), ("dual_base", base)):
        index = load_index(indexes[name])
        assert torch.allclose(torch.from_numpy(index.vectors[row]), expected, atol=1e-5), name


def test_header_records_the_adapter_base_and_embedding(runs, indexes):
    header = read_header(indexes["dual"])
    assert header["adapter"]["sha256"] == AdapterIdentity.of_folder(runs["dual"]).sha256
    assert set(header["adapter"]["files"]) == {p.name for p in runs["dual"].iterdir()}
    assert (header["embedding"], header["modalities"], header["dim"]) == ("joint", ["image", "text"], 16)
    assert header["base"]["spec"].startswith("hf:") and header["count"] == 12 and header["skipped"] == 0
    assert read_header(indexes["dual_base"])["adapter"] is None
    assert read_header(indexes["classifier"])["modalities"] == ["image"]


def test_text_queries_search_a_dual_encoder_index(runs, indexes):
    hits = query(indexes["dual"], text="a photo of a red picture", k=12)
    assert sorted(h.row for h in hits) == list(range(12))
    index = load_index(indexes["dual"])
    relevant = [rows_with(index, label=f"class{c}") for c in range(3)]
    assert [len(r) for r in relevant] == [4, 4, 4]
    recall = text_recall(index, ["a photo of a red picture", "a photo of a green picture",
                                 "a photo of a blue picture"], relevant, ks=(1, 4, 12))
    assert set(recall) == {1, 4, 12} and recall[12] == 1.0 and 0 <= recall[1] <= recall[4] <= 1
    base = text_recall(indexes["dual_base"], ["a photo of a red picture"], [relevant[0]], ks=(12,))
    assert base == {12: 1.0}


def test_a_text_query_on_a_classifier_index_is_refused_with_the_reason(runs, indexes):
    with pytest.raises(SearchError, match=r"text queries need a dual encoder's joint image-text space, but .* is a "
                                          r"'classification' run"):
        query(indexes["classifier"], text="a red picture")
    with pytest.raises(SearchError, match="text queries need a dual encoder"):
        Embedder.open(runs["classifier"]).texts(["red"])


@pytest.mark.parametrize("kind", ["classifier", "dual"])
def test_an_index_built_with_v1_is_refused_under_v2(runs, indexes, kind):
    v1, v2 = AdapterIdentity.of_folder(runs[kind]), AdapterIdentity.of_folder(runs[f"{kind}_v2"])
    with pytest.raises(StaleIndex) as error:
        query(indexes[kind], image=images(runs)[0], adapter=runs[f"{kind}_v2"])
    message = str(error.value)
    assert v1.sha256[:12] in message and v2.sha256[:12] in message
    assert "adapter_model.safetensors" in message and "rebuild the index" in message
    assert f"vislora index build {runs['images']} --adapter {runs[f'{kind}_v2'].resolve()}" in message
    with pytest.raises(StaleIndex, match="built with the base model"):
        query(indexes["dual_base"], image=images(runs)[0], embedder=Embedder.open(runs["dual"]))
    with pytest.raises(StaleIndex, match="embedded by the base model without an adapter"):
        query(indexes["dual"], image=images(runs)[0], embedder=Embedder.open(runs["dual"], base=True))


def test_a_registry_version_is_identified_by_its_recorded_hashes(runs, tmp_path):
    registry = Registry(tmp_path / "registry")
    one = registry.add("colours", runs["classifier"])
    registry.add("colours", runs["classifier_v2"])
    assert AdapterIdentity.of_files(one.files, "x").sha256 == AdapterIdentity.of_folder(runs["classifier"]).sha256
    path = build_index(runs["images"], "registry:colours@1", tmp_path / "idx", registry=tmp_path / "registry").path
    header = read_header(path)
    assert header["adapter"]["label"] == "registry:colours@1" and header["built_from"] == "registry:colours@1"
    image = images(runs)[2]
    assert query(path, image=image, k=2)[0].path == str(image)  # the header's registry reference embeds the query
    with pytest.raises(StaleIndex, match=r"registry:colours@1 \(sha256 .*registry:colours@2"):
        query(path, image=image, adapter="registry:colours@2")
    assert query(path, image=image, k=1, adapter=runs["classifier"])  # the same files, however they are reached


def test_cli_builds_queries_and_describes_an_index(runs, tmp_path):
    out = tmp_path / "cli.index"
    result = runner.invoke(app, ["index", "build", str(runs["images"]), "--adapter", str(runs["dual"]), "--out",
                                 str(out), "--workers", "0", "--batch-size", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "indexed 12 images x 16 (joint embeddings)" in result.output and "images/s" in result.output
    image = images(runs)[7]
    result = runner.invoke(app, ["index", "query", str(out), "--image", str(image), "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["hits"][0]["path"] == str(image) and [h["rank"] for h in answer["hits"]] == [1, 2, 3]
    result = runner.invoke(app, ["index", "query", str(out), "--text", "a blue picture", "-k", "2"])
    assert result.exit_code == 0 and "rank" in result.output and "score" in result.output
    result = runner.invoke(app, ["index", "info", str(out)])
    assert result.exit_code == 0 and "12 images x 16" in result.output and "sha256" in result.output
    result = runner.invoke(app, ["index", "query", str(out), "--text", "red", "--adapter", str(runs["dual_v2"])])
    assert isinstance(result.exception, StaleIndex)
    result = runner.invoke(app, ["index", "query", str(out)])
    assert "give exactly one of --text and --image" in str(result.exception)
    base = tmp_path / "base.index"
    result = runner.invoke(app, ["index", "build", str(runs["images"]), "--adapter", str(runs["classifier"]),
                                 "--out", str(base), "--base", "--workers", "0"])
    assert result.exit_code == 0 and "base model" in result.output
    result = runner.invoke(app, ["index", "query", str(base), "--text", "red"])
    assert "text queries need a dual encoder" in str(result.exception)


def test_a_multilabel_run_indexes_its_manifests_with_every_label(tmp_path):
    result, val = train_tiny_multilabel(tmp_path)
    report = build_index(val, result.adapter_dir, tmp_path / "tags.index")
    index = load_index(report.path)
    dataset = manifest(val, multilabel=MultiLabelFormat())
    assert index.count == len(dataset) == 16
    assert [row["labels"] for row in index.rows] == [list(r.labels) for r in dataset.records]
    for tag in ("red", "green"):
        assert rows_with(index, label=tag) == [i for i, r in enumerate(dataset.records) if tag in r.labels]
    hit = query(index, image=dataset.records[3].source, k=1, adapter=result.adapter_dir)[0]
    assert (hit.row, hit.labels, hit.describe_labels()) == (3, list(dataset.records[3].labels),
                                                           "|".join(dataset.records[3].labels))
