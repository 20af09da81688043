"""The index on its own (no model): FAISS and torch search agree, torch is used without faiss, the folder round-trips,
corrupt or missing files are named, and a build that fails or is killed midway leaves no half index."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import require_module
from vislora.errors import ConfigError, IndexFileError, SearchError
from vislora.search import Index, IndexWriter, load_index, recall_at_k
from vislora.search import index as index_module

HEADER = {"embedding": "joint", "base": {"spec": "hf:tiny"}, "adapter": None, "data": "images/"}


def random_vectors(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def rows(n: int, offset: int = 0) -> list[dict]:
    return [{"path": f"img/{offset + i}.png", "label": f"c{(offset + i) % 3}", "metadata": {"sku": str(offset + i)}}
            for i in range(n)]


def write_index(path, vectors: torch.Tensor, batch: int = 7, header: dict | None = None):
    with IndexWriter(path) as writer:
        for start in range(0, len(vectors), batch):
            writer.add(vectors[start:start + batch], rows(len(vectors[start:start + batch]), start))
        return writer.commit(header or HEADER)


def test_faiss_and_torch_find_the_same_rows_and_scores():
    require_module("faiss")
    vectors = torch.nn.functional.normalize(random_vectors(300, 24, 0), dim=-1).numpy()
    queries = random_vectors(9, 24, 1)
    faiss_index = Index(vectors, rows(300), HEADER, backend="faiss")
    torch_index = Index(vectors, rows(300), HEADER, backend="torch")
    assert (faiss_index.backend, torch_index.backend) == ("faiss", "torch")
    for k in (1, 10, 300, 1000):  # k above the row count returns every row
        f_scores, f_ids = faiss_index.search(queries, k)
        t_scores, t_ids = torch_index.search(queries, k)
        assert f_ids.shape == (9, min(k, 300))
        np.testing.assert_array_equal(f_ids, t_ids)
        np.testing.assert_allclose(f_scores, t_scores, atol=1e-5)
        assert (np.diff(t_scores, axis=1) <= 1e-7).all()  # best first
    exact = torch.nn.functional.normalize(queries, dim=-1) @ torch.from_numpy(vectors).T
    np.testing.assert_array_equal(t_ids[:, 0], exact.argmax(1).numpy())


def test_torch_search_in_chunks_equals_one_pass(monkeypatch):
    vectors = torch.nn.functional.normalize(random_vectors(100, 8, 2), dim=-1).numpy()
    queries = random_vectors(5, 8, 3)
    whole = Index(vectors, rows(100), HEADER, backend="torch").search(queries, 12)
    monkeypatch.setattr(index_module, "CHUNK_ROWS", 7)  # 15 chunks, the running top-k kept across them
    chunked = Index(vectors, rows(100), HEADER, backend="torch").search(queries, 12)
    np.testing.assert_array_equal(whole[1], chunked[1])
    np.testing.assert_allclose(whole[0], chunked[0], atol=1e-6)


def test_torch_is_used_when_faiss_cannot_be_imported(monkeypatch):
    monkeypatch.setattr(index_module, "import_faiss", lambda: None)
    vectors = torch.nn.functional.normalize(random_vectors(20, 4, 0), dim=-1).numpy()
    assert Index(vectors, rows(20), HEADER).backend == "torch"
    with pytest.raises(ConfigError, match=r"pip install 'vislora\[search\]'"):
        Index(vectors, rows(20), HEADER, backend="faiss")


def test_saved_index_round_trips(tmp_path):
    vectors = random_vectors(23, 6, 4) * 5  # stored L2-normalised
    path = write_index(tmp_path / "idx", vectors)
    index = load_index(path)
    assert (index.count, index.dim, index.embedding, index.modalities) == (23, 6, "joint", ("image", "text"))
    np.testing.assert_allclose(index.vectors, torch.nn.functional.normalize(vectors, dim=-1).numpy(), atol=1e-6)
    assert index.rows == rows(23)
    assert index.header["base"] == HEADER["base"] and index.header["count"] == 23
    hits = index.hits(vectors[5], k=3)[0]
    assert (hits[0].rank, hits[0].row, hits[0].path, hits[0].metadata) == (1, 5, "img/5.png", {"sku": "5"})
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(SearchError, match="6-wide vectors"):
        index.search(torch.ones(1, 5))
    with pytest.raises(SearchError, match="k must be at least 1"):
        index.search(vectors[:1], 0)


def test_corrupt_or_missing_files_are_named(tmp_path):
    with pytest.raises(IndexFileError, match="does not exist; build one with `vislora index build"):
        load_index(tmp_path / "nothing")
    (tmp_path / "folder").mkdir()
    with pytest.raises(IndexFileError, match=r"is not a search index \(no index.json\)"):
        load_index(tmp_path / "folder")
    path = write_index(tmp_path / "idx", random_vectors(10, 4, 5))
    vectors_file, header_file = path / "vectors.f32", path / "index.json"
    good = vectors_file.read_bytes()
    vectors_file.write_bytes(good[:-4])
    with pytest.raises(IndexFileError, match=r"vectors\.f32 does not match the sha256"):
        load_index(path)
    with pytest.raises(IndexFileError, match=r"holds 156 bytes, expected 10 x 4 float32 = 160"):
        load_index(path, verify=False)
    vectors_file.write_bytes(good)
    (path / "rows.jsonl").write_text("{not json\n" * 10)
    with pytest.raises(IndexFileError, match="does not match the sha256"):
        load_index(path)
    with pytest.raises(IndexFileError, match=r"rows.jsonl line 1 is not valid JSON"):
        load_index(path, verify=False)
    header_file.write_text('{"format": 1, "count": 10')
    with pytest.raises(IndexFileError, match=r"index\.json is not valid JSON"):
        load_index(path)
    header_file.write_text(json.dumps({"format": 99}))
    with pytest.raises(IndexFileError, match="format 99; this vislora reads index format 1"):
        load_index(path)
    (path / "vectors.f32").unlink()
    header_file.write_text(json.dumps({**HEADER, "format": 1, "count": 10, "dim": 4, "files": {}}))
    with pytest.raises(IndexFileError, match=r"vectors\.f32 is missing"):
        load_index(path)


def test_a_failed_build_leaves_no_half_index_and_keeps_the_previous_one(tmp_path, monkeypatch):
    def failing(path, vectors):
        with IndexWriter(path) as writer:
            writer.add(vectors[:5], rows(5))
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        failing(tmp_path / "new", random_vectors(10, 4, 0))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no index, no staging folder
    old = write_index(tmp_path / "idx", random_vectors(10, 4, 1))
    before = load_index(old)
    with pytest.raises(RuntimeError, match="disk full"):
        failing(old, random_vectors(10, 4, 2))
    real_rename = os.rename

    def rename_fails_for_the_new_folder(src, dst):
        if str(src).endswith(".partial"):
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(index_module.os, "rename", rename_fails_for_the_new_folder)
    with pytest.raises(OSError, match="rename failed"):
        write_index(old, random_vectors(10, 4, 3))
    monkeypatch.undo()
    assert not old.exists()  # killed between the two renames: the previous index is kept aside, and named
    with pytest.raises(IndexFileError, match=r"an interrupted rebuild left the previous index at .*\.idx\..*\.old"):
        load_index(old)
    aside = next(tmp_path.glob(".idx.*.old"))
    np.testing.assert_array_equal(load_index(aside).vectors, before.vectors)
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(IndexFileError, match="is not a search index"), IndexWriter(tmp_path):
        pass  # never writes over a folder that is not an index
    with pytest.raises(SearchError, match="no image was embedded"), IndexWriter(tmp_path / "empty") as writer:
        writer.commit(HEADER)


def test_a_build_killed_midway_leaves_no_half_index(tmp_path):
    old = write_index(tmp_path / "idx", random_vectors(10, 4, 1))
    before = (old / "vectors.f32").read_bytes(), (old / "index.json").read_text()
    script = textwrap.dedent(f"""
        import os, signal, torch
        from vislora.search import IndexWriter
        for target in ({str(tmp_path / 'new')!r}, {str(old)!r}):
            pid = os.fork()
            if pid == 0:
                with IndexWriter(target) as writer:
                    writer.add(torch.randn(8, 4), [{{"path": str(i)}} for i in range(8)])
                    os.kill(os.getpid(), signal.SIGKILL)
            os.waitpid(pid, 0)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert not (tmp_path / "new").exists()
    assert ((old / "vectors.f32").read_bytes(), (old / "index.json").read_text()) == before
    assert load_index(old).count == 10
    assert all(p.name.endswith(".partial") for p in tmp_path.iterdir() if p.name.startswith("."))  # hidden leftovers


def test_recall_at_k_counts_a_query_found_when_a_relevant_row_is_in_its_top_k():
    vectors = torch.eye(6)
    index = Index(vectors.numpy(), rows(6), HEADER, backend="torch")
    queries = torch.stack([vectors[0], vectors[1] + 0.5 * vectors[2], vectors[4] + 0.9 * vectors[5]])
    recall = recall_at_k(index, queries, [0, {2}, [5, 3]], ks=(1, 2))
    assert recall == {1: pytest.approx(1 / 3), 2: 1.0}
    with pytest.raises(ConfigError, match="3 queries but 2"):
        recall_at_k(index, queries, [0, 1])
