"""Visual search: embed an image folder or manifest with a trained adapter into an index, query it with a text or an
image, measure text->image recall@K.

    from vislora.search import build_index, load_index, query

    build_index("catalogue/", "runs/products-clip/adapter", "catalogue.index")
    for hit in query("catalogue.index", text="a red summer dress", k=5):
        print(hit.rank, f"{hit.score:.3f}", hit.path)

A dual-encoder run (contrastive / few_shot) embeds into its joint image-text space, so texts and images both query
its index; a classifier run embeds the pooled features its head reads, so its index answers image queries only. The
index records the sha256 of the adapter's files: a query embedded with another version of the adapter is refused
(StaleIndex) until the index is rebuilt. See docs/search.md.
"""

from vislora.search.api import (
    BuildReport,
    build_index,
    check_embedder,
    check_identity,
    check_modality,
    embed_query,
    open_query,
    query,
    recall_at_k,
    rows_with,
    text_recall,
)
from vislora.search.embed import AdapterIdentity, Embedder, resolve_adapter
from vislora.search.index import Hit, Index, IndexWriter, import_faiss, load_index, read_header

__all__ = ["AdapterIdentity", "BuildReport", "Embedder", "Hit", "Index", "IndexWriter", "build_index",
           "check_embedder", "check_identity", "check_modality", "embed_query", "import_faiss", "load_index",
           "open_query", "query", "read_header", "recall_at_k", "resolve_adapter", "rows_with", "text_recall"]
