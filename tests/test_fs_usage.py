"""No run-mode code touches a file except through cm3leon_jax/fs.py (so gs:// works everywhere).

An AST scan of cm3leon_jax/ and tasks/: a call to `open`, `os.path.exists`-like checks,
`os` / `shutil` / `glob` file operations is allowed only in fs.py itself and in the
places listed below, each for a path that is never a user's (files inside the
repository or the installed package, temporary folders, local-only tools).
`os.path.join` / `basename` / `dirname` are string operations and work on gs:// paths;
`os.path.abspath(__file__)` finds the package's own files. `pathlib` (local files only)
is not imported, and PIL and torch read from file objects (`fs.open`, `io.BytesIO`) or an
`fs.local_copy`, never from a path. `tf.io.gfile` is what fs.py uses for remote paths;
called elsewhere it would be a second file layer (export/ once was one), so it is refused
too.
"""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOTS = ("cm3leon_jax", "tasks")
OS_PATH = {"exists", "isdir", "isfile", "getsize", "abspath", "realpath", "getmtime", "lexists"}
OS = {"makedirs", "mkdir", "listdir", "replace", "rename", "remove", "unlink", "walk",
      "scandir", "stat", "rmdir"}
MODULES = {"shutil", "glob", "filecmp"}
LOCAL_ONLY_MODULES = {"pathlib"}  # Path.open / read_text / exists / rglob: no gs://.
PIL_IMAGE = {"Image", "PILImage"}

# (file, function) -> why its file access is not on a user path.
ALLOWED = {
    ("cm3leon_jax/fs.py", "*"): "the layer itself",
    ("cm3leon_jax/testing/*", "*"): "test helpers",
    ("cm3leon_jax/main.py", "configure"): "gin files: repository search paths (gin reads them)",
    ("cm3leon_jax/main.py", "parse_args"): "gin search folders (gin reads them)",
    ("cm3leon_jax/main.py", "_find"): "gin files (gin reads them)",
    ("cm3leon_jax/model/cpu_kernels.py", "_library"):
        "the CPU kernels' source in the package and their build in a local cache folder "
        "(a shared library loads from a local path)",
    ("cm3leon_jax/model/cpu_kernels.py", "_read_local"): "the package's source, /proc/cpuinfo",
}


def _fs_opened_names(tree: ast.AST) -> set[str]:
    """Names bound by `with fs.open(...) as name` or `with fs.local_copy(...) as name`
    anywhere in the module."""
    return {item.optional_vars.id for node in ast.walk(tree) if isinstance(node, ast.With)
            for item in node.items
            if isinstance(item.context_expr, ast.Call)
            and ast.unparse(item.context_expr.func) in ("fs.open", "fs.local_copy")
            and isinstance(item.optional_vars, ast.Name)}


def _opens_a_path(node: ast.Call, fs_files: set[str]) -> bool:
    """`Image.open(x)` or `torch.load(x)` where x is neither a file object from fs.open (or
    a local copy from fs.local_copy) nor an in-memory buffer."""
    parts = ast.unparse(node.func).split(".")
    reader = (len(parts) == 2 and parts[0] in PIL_IMAGE and parts[1] == "open") or (
        parts == ["torch", "load"])
    if not reader or not node.args:
        return False
    arg = node.args[0]
    in_memory = isinstance(arg, ast.Call) and ast.unparse(arg.func) in ("io.BytesIO", "BytesIO")
    return not in_memory and not (isinstance(arg, ast.Name) and arg.id in fs_files)


def calls(tree: ast.AST):
    """(function name, dotted callee) of every file-touching call in a module."""
    stack = []
    fs_files = _fs_opened_names(tree)

    def visit(node):
        named = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        if named:
            stack.append(node.name)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""])
            for name in names:
                if name.split(".")[0] in LOCAL_ONLY_MODULES:
                    yield (stack[0] if stack else "<module>"), f"import {name}", node.lineno
        if isinstance(node, ast.Call) and _opens_a_path(node, fs_files):
            yield (stack[0] if stack else "<module>"), ast.unparse(node.func), node.lineno
        if isinstance(node, ast.Call):
            callee = ast.unparse(node.func)
            parts = callee.split(".")
            bad = (callee == "open"
                   or (parts[:2] == ["os", "path"] and parts[-1] in OS_PATH and len(parts) == 3)
                   or (parts[0] == "os" and len(parts) == 2 and parts[1] in OS)
                   or (parts[0] in MODULES and len(parts) == 2 and callee != "shutil.which")
                   or "gfile" in parts[:-1])  # tf.io.gfile.X, gfile.X: fs.py's remote half.
            if bad and not (node.args and ast.unparse(node.args[0]) == "__file__"):
                yield (stack[0] if stack else "<module>"), callee, node.lineno
        for child in ast.iter_child_nodes(node):
            yield from visit(child)
        if named:
            stack.pop()
    yield from visit(tree)


def allowed(path: str, function: str) -> bool:
    for (file, fn) in ALLOWED:
        file_ok = path == file or (file.endswith("/*") and path.startswith(file[:-1]))
        if file_ok and fn in ("*", function):
            return True
    return False


def test_no_direct_file_access_outside_fs():
    offenders = []
    for root in ROOTS:
        for folder, _, names in os.walk(os.path.join(REPO, root)):
            for name in sorted(names):
                if not name.endswith(".py"):
                    continue
                path = os.path.relpath(os.path.join(folder, name), REPO)
                with open(os.path.join(REPO, path)) as f:
                    tree = ast.parse(f.read())
                offenders += [f"{path}:{line} {fn}(): {callee}"
                              for fn, callee, line in calls(tree) if not allowed(path, fn)]
    assert not offenders, ("file access outside cm3leon_jax/fs.py (use fs.open, fs.exists, "
                           "...; or add a justified ALLOWED entry):\n" + "\n".join(offenders))


def test_the_scan_finds_direct_access():
    tree = ast.parse("import os\ndef f(p):\n    os.makedirs(p)\n    return open(p)\n"
                     "def g(p):\n    with tf.io.gfile.GFile(p) as f:\n        return f.read()\n")
    assert [(fn, c) for fn, c, _ in calls(tree)] == [
        ("f", "os.makedirs"), ("f", "open"), ("g", "tf.io.gfile.GFile")]


def test_the_scan_covers_export():
    """export/ reads and writes user folders (checkpoints, exports, released weights)."""
    scanned = {os.path.relpath(os.path.join(folder, n), REPO)
               for root in ROOTS for folder, _, names in os.walk(os.path.join(REPO, root))
               for n in names if n.endswith(".py")}
    assert {"cm3leon_jax/train/staging.py", "cm3leon_jax/export/hf_import.py",
            "cm3leon_jax/export/chameleon_release.py"} <= scanned


def test_the_scan_finds_pathlib_and_images_opened_from_paths():
    tree = ast.parse(
        "import pathlib\nfrom pathlib import Path\n"
        "def f(p):\n    return Image.open(p)\n"
        "def g(p):\n    with fs.open(p, 'rb') as fh, Image.open(fh) as im:\n        return im\n"
        "def h(b):\n    return PILImage.open(io.BytesIO(b))\n"
        "def t(p):\n    return torch.load(p)\n"
        "def u(p):\n    with fs.local_copy(p) as q:\n        return torch.load(q)\n"
        "def v(a, b):\n    return filecmp.cmp(a, b)\n")
    assert [(fn, c) for fn, c, _ in calls(tree)] == [
        ("<module>", "import pathlib"), ("<module>", "import pathlib"), ("f", "Image.open"),
        ("t", "torch.load"), ("v", "filecmp.cmp")]
