"""build_engine: the engine a ServeConfig describes. The base model's kind picks the engine class (`ENGINES`); the
adapters are loaded and the rollouts set before it is handed back.

    with build_engine(ServeConfig.parse({"adapters": {"cats": "runs/cats/adapter"}})) as engine:
        engine.predict("cat.png", adapter="cats").labels[0]
"""

from __future__ import annotations

from collections.abc import Mapping

from vislora.devices import Placement
from vislora.errors import ConfigError
from vislora.model import AdaptedModel
from vislora.serve.config import ServeConfig
from vislora.serve.dual import DualEngine
from vislora.serve.engine import Engine, check_name
from vislora.serve.generate import GenerativeEngine
from vislora.serve.sources import base_from_task, build_base, build_vlm_base, open_source

ENGINES: Mapping[str, type[Engine]] = {"classifier": Engine, "dual_encoder": DualEngine,
                                       "generative": GenerativeEngine}  # base.kind -> engine


def build_engine(config: ServeConfig, engines: Mapping[str, type[Engine]] = ENGINES, preload: bool = True) -> Engine:
    """Build the base (from config.base, or the first adapter's task.json) and the engine class `engines` names for
    its kind on config.device in config.dtype, load the adapters and set the rollouts; a failure closes the engine
    before it is raised. With `preload` False the adapters are only read for the base and left unloaded, rollouts
    unset (Ray Serve replicas load adapters on demand, see vislora.serve.ray)."""
    sources = {check_name(name): open_source(ref, config.registry) for name, ref in config.adapters.items()}
    trained = next((s for s in sources.values() if s.task), None) if config.base is None else None
    if config.base is None and trained is None:
        raise ConfigError(f"none of the adapters {sorted(sources)} has a task.json naming its base model; give "
                          "base.spec and base.num_classes in the config (or --base/--num-classes)")
    base = config.base or base_from_task(trained.task)
    if base.kind not in engines:
        raise ConfigError(f"no engine serves a {base.kind!r} base (engines given for: {sorted(engines)}); add one "
                          f"to `engines`, e.g. {{**ENGINES, {base.kind!r}: MyEngine}}")
    placement = Placement.resolve(config.device, config.dtype)  # before the base is built: a bad device fails fast
    if base.kind == "generative":  # the engine also needs the VLM's processor and the generate limits
        vlm = build_vlm_base(base)
        model, head, spec, extra = vlm.model, None, vlm.image_spec, {"vlm": vlm, "generate": config.generate}
    else:
        (model, head, spec), extra = build_base(base, trained), {}
    engine = engines[base.kind](AdaptedModel(model), head, spec, base, batching=config.batching,
                                limits=config.limits, seed=config.seed, registry=config.registry,
                                feedback=config.feedback, health=config.health, placement=placement, **extra)
    if not preload:
        return engine
    try:
        for name, source in sources.items():
            engine.load(name, source)
        for name, rollout in config.rollouts.items():
            engine.set_rollout(name, rollout)
    except BaseException:
        engine.close()
        raise
    return engine
