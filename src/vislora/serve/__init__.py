"""Serve many adapters over one base model: `Engine` in-process, `create_app` over HTTP (FastAPI).

    from vislora.serve import Engine, ServeConfig
    with Engine.from_config(ServeConfig.parse({"adapters": {"cats": "runs/cats/adapter"}})) as engine:
        print(engine.predict("cat.png", adapter="cats").labels[0])
"""

from vislora.serve.app import create_app
from vislora.serve.config import ServeConfig
from vislora.serve.engine import Engine
from vislora.serve.records import Embedding, Label, LoadedAdapter, Prediction

__all__ = ["Embedding", "Engine", "Label", "LoadedAdapter", "Prediction", "ServeConfig", "create_app"]
