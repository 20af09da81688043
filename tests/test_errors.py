"""One hierarchy: every exception class of the library is defined in vislora.errors and derives from VisloraError;
vislora exports them, vislora.serve the server's HTTP errors (ServeError and its subclasses)."""

import ast
import inspect
from pathlib import Path

import vislora
import vislora.serve
from vislora import errors

SRC = Path(vislora.__file__).parent
HOMES = {SRC / "errors.py"}


def test_every_exception_class_lives_in_errors_py():
    elsewhere = []
    for path in sorted(set(SRC.rglob("*.py")) - HOMES):
        for node in ast.walk(ast.parse(path.read_text())):
            bases = [ast.unparse(b) for b in getattr(node, "bases", [])]
            if isinstance(node, ast.ClassDef) and any(b.endswith(("Error", "Exception")) for b in bases):
                elsewhere.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}")
    assert elsewhere == []


def test_every_error_is_a_vislora_error_and_exported():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if not issubclass(c, Warning)]
    assert all(issubclass(c, errors.VisloraError) for c in classes)
    serve = {c.__name__ for c in classes if issubclass(c, errors.ServeError)}
    assert serve and serve <= set(vislora.serve.__all__)
    assert {c.__name__ for c in classes} - serve <= set(vislora.__all__)
