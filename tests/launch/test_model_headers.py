"""Each model file's documented command (`# Use:` in gin_configs/models/*.gin) configures it.

main.py parses gin files in the order given and gin keeps the last binding, so a run
file given after the model (gin_configs/runs/pretrain.gin resets the mesh and the
z-loss) would silently undo it. Here, with gin parsing only (nothing trains): the
command parses with every `%gin.REQUIRED` bound, and ends with the model file's
architecture and z-loss and the mesh of the last mesh-setting file it names
(gin_configs/meshes/, pods/ or train/).
"""

import glob
import os
import shlex

import gin
import pytest

from cm3leon_jax import main as main_lib
from launch import common

MODELS = os.path.join(common.REPO, "gin_configs", "models")
MESH_FOLDERS = ("gin_configs/meshes/", "gin_configs/pods/", "gin_configs/train/")
ARCHITECTURE = ("DecoderConfig.vocab_size", "DecoderConfig.num_layers",
                "DecoderConfig.d_model", "DecoderConfig.num_heads", "DecoderConfig.mlp_dim")


def use_command(path: str) -> str | None:
    """The `# Use:` command of a model file's header, continuation lines joined."""
    with open(path) as f:
        lines = [line[1:].strip() for line in f if line.startswith("#")]
    for i, line in enumerate(lines):
        if line.startswith("Use:"):
            command = line.removeprefix("Use:").strip()
            while command.endswith("\\"):
                i += 1
                command = command[:-1] + " " + lines[i]
            return command
    return None


def runnable(path: str) -> bool:
    """A command without placeholders (`<run>`): one that names every file it needs."""
    command = use_command(path)
    return command is not None and "<" not in command


FILES = sorted(f for f in glob.glob(os.path.join(MODELS, "*.gin")) if runnable(f))


def parsed(files, bindings, keys, finalize=False) -> dict:
    """What gin binds to `keys` after `files` and `bindings` (None: unbound)."""
    gin.clear_config()
    try:
        main_lib.configure(files, bindings, finalize=finalize)
        out = {}
        for k in keys:
            try:
                out[k] = gin.query_parameter(k)
            except ValueError:
                out[k] = None
        return out
    finally:
        gin.clear_config()


def test_the_paper_size_models_document_a_runnable_command():
    names = {os.path.basename(f) for f in FILES}
    assert {"cm3leon_350m.gin", "cm3leon_760m.gin", "cm3leon_7b.gin", "chameleon_7b.gin",
            "chameleon_34b.gin"} <= names


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_model_header_command_configures_its_model_mesh_and_z_loss(path, monkeypatch):
    monkeypatch.chdir(common.REPO)
    argv = shlex.split(use_command(path))
    assert argv[:3] == ["python", "-m", "cm3leon_jax.main"], argv
    files, bindings, _ = main_lib.parse_args(argv[3:])
    mesh_files = [f for f in files if f.startswith(MESH_FOLDERS)]
    assert mesh_files, f"{path}: the command names no mesh (gin_configs/meshes, pods, train)"
    keys = (*common.MESH_KEYS, "cross_entropy_loss.z_loss", *ARCHITECTURE)
    # finalize: every %gin.REQUIRED is bound, as main.py checks before it runs anything.
    got = parsed(files, bindings, keys, finalize=True)
    mesh = parsed([mesh_files[-1]], [], common.MESH_KEYS)
    model = parsed([path], [], ("cross_entropy_loss.z_loss", *ARCHITECTURE))
    assert {k: got[k] for k in common.MESH_KEYS} == mesh, "the mesh is not the named one"
    assert got["cross_entropy_loss.z_loss"] == (model["cross_entropy_loss.z_loss"] or 0.0)
    assert {k: got[k] for k in ARCHITECTURE} == {k: model[k] for k in ARCHITECTURE}
