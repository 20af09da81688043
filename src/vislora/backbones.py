"""Build a base model from a short spec: `timm:<name>`, `hf:<id or path>`, `open_clip:<name>`."""

from __future__ import annotations

from typing import Any

from torch import nn

from vislora.errors import ConfigError

FAMILIES = ("timm", "hf", "open_clip")


def load_base_model(spec: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A base model in eval mode. A bare name is a timm architecture.

    With pretrained=False timm and open_clip build the architecture with random weights (no download);
    `hf:` always loads from a hub id or a local directory, as Hugging Face does.
    """
    family, _, name = spec.partition(":") if ":" in spec else ("timm", "", spec)
    if family not in FAMILIES or not name:
        raise ConfigError(f"model spec {spec!r} is not understood; use timm:<name>, hf:<id or path> or "
                          "open_clip:<name> (e.g. timm:vit_base_patch16_224)")
    if family == "timm":
        import timm

        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
            raise ConfigError(f"timm has no model {name!r}; similar names: {', '.join(close) or 'none'}")
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    elif family == "hf":
        from transformers import AutoModel

        model = AutoModel.from_pretrained(name, **kwargs)
    else:
        import open_clip

        model = open_clip.create_model(name, pretrained="openai" if pretrained else None, **kwargs)
    return model.eval()
