"""Every documented command that trains the user's corpus names its data folder.

`train.task = 'cm3leon_user'` (every gin_configs/train/cm3leon_*.gin, and the pod files
that include them) reads `data_dirs.user`, which nothing binds by default: a command
without `--gin.data_dirs.user=...` stops at its first batch. Commands are collected from
README.md, launch/ (docstrings, scripts) and gin file headers, continuation lines joined;
one that elides its arguments (`...`) or names no existing gin file is not checked.
"""

import ast
import glob
import os
import re
import shlex

from launch import common

SOURCES = ["README.md", *sorted(os.path.relpath(p, common.REPO) for p in [
    *glob.glob(os.path.join(common.REPO, "launch", "*")),
    *glob.glob(os.path.join(common.REPO, "gin_configs", "**", "*.gin"), recursive=True)])]


def commands(text: str) -> list[str]:
    """`python -m ...` lines (after a comment's `#`, `Use:` or `GKE:`), joined over `\\`."""
    found, current = [], None
    for raw in text.splitlines():
        line = re.sub(r"^\s*#?\s*(Use:|GKE:)?\s*", "", raw).rstrip()
        if current is None and not line.startswith("python -m "):
            continue
        current = line if current is None else f"{current} {line}"
        if current.endswith("\\"):
            current = current[:-1].rstrip()
        else:
            found.append(current)
            current = None
    return found


def gin_task(path: str, task: str | None) -> tuple[str | None, bool]:
    """(train.task, whether data_dirs.user is bound) after reading `path` and its includes."""
    user = False
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        include = re.fullmatch(r"include\s+(['\"])(.+)\1", line)
        if include and common._gin_include_path(include.group(2)):
            task, included = gin_task(common._gin_include_path(include.group(2)), task)
            user = user or included
        binding = re.fullmatch(r"([\w./]+)\s*=\s*(.+)", line)
        if binding and binding.group(1) == "train.task":
            task = ast.literal_eval(binding.group(2))
        user = user or bool(binding and binding.group(1) == "data_dirs.user")
    return task, user


def trains_without_user_data(command: str) -> bool:
    argv = shlex.split(command)
    if "..." in argv:
        return False
    files = [a.removeprefix("--gin_file=") for a in argv
             if a.endswith(".gin") and not a.startswith("--gin.")]
    files = [f for f in files if os.path.isfile(os.path.join(common.REPO, f))]
    task, user = None, False
    for f in files:
        task, bound = gin_task(os.path.join(common.REPO, f), task)
        user = user or bound
    for arg in argv:
        key, _, value = arg.removeprefix("--gin.").partition("=")
        if arg.startswith("--gin.") and key == "train.task":
            task = ast.literal_eval(value)
        user = user or (arg.startswith("--gin.") and key == "data_dirs.user")
    return task == "cm3leon_user" and not user


def test_commands_that_train_the_user_corpus_bind_its_folder():
    checked, missing = 0, []
    for source in SOURCES:
        with open(os.path.join(common.REPO, source)) as f:
            for command in commands(f.read()):
                checked += 1
                if trains_without_user_data(command):
                    missing.append(f"{source}: {command}")
    assert checked > 20
    assert not missing, "\n".join(missing)


def test_the_check_sees_the_commands_it_is_for():
    assert trains_without_user_data(
        "python -m cm3leon_jax.main --gin_file=gin_configs/train/cm3leon_7b.gin "
        "--gin.MODEL_DIR=\"'gs://b/7b'\"")
    assert trains_without_user_data(
        "python -m launch.slurm gin_configs/train/cm3leon_350m.gin /shared/runs/350m --nodes=2")
    assert not trains_without_user_data(
        "python -m launch.tpu_vm gin_configs/pods/cm3leon_7b_v5p256.gin gs://b/7b "
        "--gin.data_dirs.user=\"'gs://b/data'\" --name=n")
    assert not trains_without_user_data(  # tiny.gin: the synthetic corpus
        "python -m cm3leon_jax.main --gin_file=gin_configs/train/tiny.gin")
    assert "python -m launch.slurm gin_configs/train/cm3leon_350m.gin /shared/runs/350m " \
        "--gin.data_dirs.user=\"'/shared/data'\" --nodes=2" in commands(
            open(os.path.join(common.REPO, "launch", "slurm.py")).read())[0]
