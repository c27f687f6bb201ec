"""A run mode that writes one file: lets tests exercise the entry point cheaply."""

import os

import gin


@gin.configurable
def echo_mode(model_dir: str, message: str = gin.REQUIRED) -> None:
    with open(os.path.join(model_dir, "echo.txt"), "w") as f:
        f.write(message)
