"""Small functions: the longest function (or method) in cm3leon_jax/ is under 80 lines."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_LINES = 80


def long_functions(source: str, limit: int = MAX_LINES) -> list[tuple[str, int, int]]:
    """(name, first line, length) of every function of `source` with `limit` lines or more."""
    return [(node.name, node.lineno, node.end_lineno - node.lineno + 1)
            for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 >= limit]


def test_every_function_is_under_80_lines():
    found = [f"{path.relative_to(ROOT)}:{line} {name}: {n} lines"
             for path in sorted((ROOT / "cm3leon_jax").rglob("*.py"))
             for name, line, n in long_functions(path.read_text())]
    assert not found, (f"functions of {MAX_LINES} lines or more; split them into pieces "
                       "that each do one thing:\n" + "\n".join(found))


def test_the_check_counts_nested_functions_and_methods():
    body = "\n".join(f"        x{i} = {i}" for i in range(80))
    source = f"class A:\n    def method(self):\n{body}\n\ndef short():\n    return 1\n"
    assert long_functions(source) == [("method", 2, 81)]
