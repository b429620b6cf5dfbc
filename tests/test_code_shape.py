"""The shape of the code itself: small functions, a module that reads in a few screens."""

import ast
from pathlib import Path

import kd_lightning

PACKAGE = Path(kd_lightning.__file__).parent
MAX_FUNCTION_LINES = 50
MAX_MODULE_CLASS_LINES = 250


def definitions(kind):
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, kind):
                yield f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_50_lines():
    long = {name: lines for name, lines in definitions((ast.FunctionDef, ast.AsyncFunctionDef)) if lines > MAX_FUNCTION_LINES}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_distillation_module_stays_small():
    (lines,) = [lines for name, lines in definitions(ast.ClassDef) if name.endswith(" DistillationModule")]
    assert lines < MAX_MODULE_CLASS_LINES
