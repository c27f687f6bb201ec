"""pytorch-fid's Inception weights file -> the variables of `inception.FIDInception`.

    variables = load("pt_inception-2015-12-05-6726825d.pth")

The file is the state dict pytorch-fid downloads (the TensorFlow 2015 Inception graph
ported to torch; FID's reference weights). Its keys are `<block>.<branch>.conv.weight`
and `<block>.<branch>.bn.{weight,bias,running_mean,running_var}`; the 1008-way `fc`
and `num_batches_tracked` are not needed for features. Nothing is downloaded: get the
file once (it is public at github.com/mseitzer/pytorch-fid/releases, `fid_weights`)
and point at it. Reading the `.pth` needs torch (the `ref` extra); a state dict that
is already a mapping of arrays (e.g. saved with `np.savez`) needs nothing.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cm3leon_jax import fs
from cm3leon_jax.errors import MissingInputError, UserInputError
from cm3leon_jax.evaluation import inception

_SKIPPED = ("fc.", "AuxLogits.")
_FILE = "pt_inception-2015-12-05-6726825d.pth"
_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{_FILE}"
# What numpy and torch raise on a file that is not what they read (empty, an HTML page,
# cut short): zipfile.BadZipFile and torch's zip errors are ValueError / RuntimeError.
_UNREADABLE = (EOFError, pickle.UnpicklingError, ValueError, RuntimeError)


def _read(path: str) -> dict[str, np.ndarray]:
    if not fs.exists(path):
        raise MissingInputError(f"Inception weights {path!r} do not exist; download "
                                f"{_FILE} from pytorch-fid's "
                                "releases (fid_weights) and give its path.")
    if path.endswith(".npz"):
        try:
            with fs.np_load(path) as z:
                return {k: z[k] for k in z.files}
        except (*_UNREADABLE, zipfile.BadZipFile) as e:
            raise _unreadable(path, e) from e
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError(f"reading {path!r} needs torch: pip install -e '.[ref]' (or "
                          "convert the state dict to .npz once elsewhere).") from e
    try:
        with fs.open(path, "rb") as f:  # Through fs: a gs:// path reads too.
            state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    except _UNREADABLE as e:
        raise _unreadable(path, e) from e
    if not isinstance(state, Mapping):
        raise _unreadable(path, TypeError(f"it holds a {type(state).__name__}, not a state "
                                          "dict"))
    return {k: v.numpy() for k, v in state.items()}


def _unreadable(path: str, error: Exception) -> UserInputError:
    """The one error for a weights file that is there but cannot be read: most often an
    interrupted download, or the release page's HTML saved by `curl` without -L."""
    with fs.open(path, "rb") as f:
        head = f.read(512)
    npz = path.endswith(".npz")
    if not head:
        why = "the file is empty"
    elif head.lstrip().startswith(b"<"):
        why = "it is an HTML page, not the weights"
    elif npz or isinstance(error, pickle.UnpicklingError):
        why = "not an .npz of arrays" if npz else "not a torch state dict"
    else:  # The first sentence: torch goes on with advice that does not apply here.
        why = f"{type(error).__name__}: {str(error).split('. ')[0].splitlines()[0][:160]}"
    again = "write it again with np.savez, or " if npz else ""
    return UserInputError(f"Inception weights {path!r} are unreadable ({why}); {again}download "
                          f"{_FILE} again (curl -L -o {_FILE} {_URL}) and give its path.")


def convert(state_dict: Mapping[str, Any]) -> dict:
    """A pytorch-fid Inception state dict (name -> array) -> {"params", "batch_stats"}.

    Every parameter the Flax network has must be there with the right shape; names
    it does not know are an error too (a different network's file).
    """
    want = jax.eval_shape(inception.random_variables)
    flat_want = traverse_util.flatten_dict(jax.tree_util.tree_map(lambda s: s.shape, want),
                                           sep="/")
    flat: dict[str, np.ndarray] = {}
    for name, value in state_dict.items():
        if name.startswith(_SKIPPED) or name.endswith("num_batches_tracked"):
            continue
        value = np.asarray(value, np.float32)
        *module, layer, field = name.split(".")
        collection, leaf = {("conv", "weight"): ("params", "kernel"),
                            ("bn", "weight"): ("params", "scale"),
                            ("bn", "bias"): ("params", "bias"),
                            ("bn", "running_mean"): ("batch_stats", "mean"),
                            ("bn", "running_var"): ("batch_stats", "var")}.get(
                                (layer, field), (None, None))
        key = "/".join([collection or "?", *module, layer, leaf or field])
        if key not in flat_want:
            raise ValueError(f"{name!r} is not a weight of pytorch-fid's FID Inception; is "
                             "this the pt_inception-2015-12-05 file?")
        if field == "weight" and layer == "conv":
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if value.shape != flat_want[key]:
            raise ValueError(f"{name!r} has shape {value.shape}, the FID Inception expects "
                             f"{flat_want[key]}.")
        flat[key] = value
    missing = sorted(set(flat_want) - set(flat))
    if missing:
        raise ValueError(f"the state dict lacks {len(missing)} weights, e.g. {missing[0]!r}.")
    nested = traverse_util.unflatten_dict(flat, sep="/")
    return jax.tree_util.tree_map(jnp.asarray, nested)


def load(path: str) -> dict:
    """pytorch-fid's `pt_inception-2015-12-05-*.pth` (or an .npz of its state dict) ->
    the variables of `inception.FIDInception`; weights of another network are refused
    naming the file."""
    state = _read(path)
    try:
        return convert(state)
    except ValueError as e:
        raise UserInputError(f"Inception weights {path!r} are not pytorch-fid's FID Inception: "
                             f"{e} Give pt_inception-2015-12-05-6726825d.pth.") from None
