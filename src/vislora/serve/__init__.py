"""Serve many adapters over one base model: `build_engine` in-process, `create_app` over HTTP (FastAPI).

    from vislora.serve import ServeConfig, build_engine
    with build_engine(ServeConfig.parse({"adapters": {"cats": "runs/cats/adapter"}})) as engine:
        print(engine.predict("cat.png", adapter="cats").labels[0])
"""

from vislora.errors import (
    BadImage,
    Busy,
    Conflict,
    Forbidden,
    ServeError,
    Timeout,
    TooLarge,
    Unauthorized,
    UnknownAdapter,
    UnknownIndex,
    UnknownRequest,
    UnsupportedMedia,
)
from vislora.serve.app import create_app
from vislora.serve.config import ServeConfig
from vislora.serve.engine import Engine
from vislora.serve.factory import build_engine
from vislora.serve.generate import Generated, GenerativeEngine
from vislora.serve.records import Embedding, Label, LoadedAdapter, Prediction

__all__ = ["BadImage", "Busy", "Conflict", "Embedding", "Engine", "Forbidden", "Generated",
           "GenerativeEngine", "Label", "LoadedAdapter", "Prediction",
           "ServeConfig", "ServeError", "Timeout", "TooLarge", "Unauthorized", "UnknownAdapter", "UnknownIndex",
           "UnknownRequest", "UnsupportedMedia",
           "build_engine", "create_app"]
