"""Install packages into this Python's environment with uv, under pip's own configuration.

    .venv/bin/python tools/install.py -e '.[dev,ref,beam]'
    .venv/bin/python tools/install.py --no-deps pytorch-fid==0.3.0

`make install` (and so `make demo` and `make test`) calls this. uv resolves the same
versions as pip but downloads and unpacks in parallel: the project's install took 42 s
instead of about 3.4 minutes on the 2-core machine, plus about a minute to byte-compile
the 21,000 installed files. That minute is not optional here: where Python may not write
bytecode at import time (PYTHONDONTWRITEBYTECODE, read-only installs), a process would
compile tensorflow, jax and seqio from source at every start (`import tasks`: 27 CPU s
instead of 11), and the tests start about two dozen processes.

Whatever pip is configured with on this machine (index, extra indexes, local
wheel folders, constraints, certificates: `pip config list`, environment included) is
passed on, and uv picks the best version across all indexes as pip does. If uv cannot be
installed or fails, the same install runs with pip, so the result never depends on uv.
"""

from __future__ import annotations

import os
import subprocess
import sys

UV = "uv==0.13.9"


def pip_settings() -> dict[str, str]:
    """pip's effective configuration, {key: value}; environment variables win, as in pip."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], check=True,
                         capture_output=True, text=True).stdout
    settings, from_env = {}, {}
    for line in out.splitlines():
        name, _, value = line.partition("=")
        scope, _, key = name.rpartition(".")
        value = value.strip().strip("'\"")
        (from_env if scope == ":env:" else settings)[key] = value
    return {**settings, **from_env}


def uv_arguments(settings: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """uv pip install's flags and environment for pip's settings."""
    args = ["--index-strategy", "unsafe-best-match"]  # pip's rule: best version of any index
    flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url",
             "find-links": "--find-links", "constraint": "--constraint"}
    for key, flag in flags.items():
        for value in settings.get(key, "").split():
            args += [flag, value]
    env = {}
    if settings.get("cert"):
        env["SSL_CERT_FILE"] = settings["cert"]
    if settings.get("default-timeout"):
        env["UV_HTTP_TIMEOUT"] = settings["default-timeout"]
    return args, env


def main(packages: list[str]) -> int:
    if not packages:
        print("usage: python tools/install.py [pip install arguments]", file=sys.stderr)
        return 2
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    uv = os.path.join(os.path.dirname(sys.executable), "uv")
    try:
        if not os.path.exists(uv):
            subprocess.run([*pip, UV], check=True)
        args, env = uv_arguments(pip_settings())
        subprocess.run([uv, "pip", "install", "-q", "--compile-bytecode",
                        "--python", sys.executable, *args, *packages],
                       check=True, env={**os.environ, **env})
        return 0
    except (OSError, subprocess.CalledProcessError) as error:
        print(f"[install] uv failed ({error}); installing with pip instead", file=sys.stderr)
    return subprocess.run([*pip, *packages], check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
