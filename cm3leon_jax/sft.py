"""The `sft` run mode: supervised fine-tuning of a pretrained decoder on the SFT mixture.

    python -m cm3leon_jax.main --gin_file=gin_configs/runs/sft.gin \
        --gin.MODEL_DIR="'runs/sft'" --gin.BASE_MODEL_DIR="'runs/demo/pretrain'"

The pretraining trainer, unchanged, with one difference: a run that has no checkpoint
yet starts from the base run's parameters (its newest readable checkpoint, or
`base_step`; or an export, such as imported weights), with a fresh optimizer and step 0
(paper: LR 5e-5, 150 warm-up steps), and records which (MODEL_DIR/sft_base.json).
Everything is written to the SFT run's own MODEL_DIR, and rerunning the same command
resumes from there exactly like pretraining, without reading the base again (a rerun that
names another base is refused); the base MODEL_DIR is only read.

Before anything trains, the base must fit: its vocabulary must be the one the SFT data
was made with (`sft_preprocess` copies the pretraining data's `vocab/`). The model's
sizes come from the base's `config.gin` (`train/run_config.py`: sft.gin binds none, so it
fine-tunes a base of any size; a size bound explicitly must agree), and the parameter
shapes in its checkpoint must fit them. A mismatch is one error naming both sides.
The SFT data must hold the split the run evaluates on (`train.eval_split`, at the end and
every `train.eval_every` steps): its dataset is built at the first evaluation, so SFT data
made with a train split only would otherwise fail only after training to it.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import gin
import jax
import seqio

from cm3leon_jax import fs
from cm3leon_jax.data import sft_preprocess, sft_prompts, shards
from cm3leon_jax.decode import restore
from cm3leon_jax.errors import MissingInputError, ModelDirMismatchError, UserInputError
from cm3leon_jax.model.config import DecoderConfig
from cm3leon_jax.train import checkpoints, params_checkpoint, run_config, trainer
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary, vocabulary_files


def _sft_families(task: str) -> dict[str, str]:
    """{family: its SFT data folder} of the SFT families (tasks/sft.py: `cm3leon_sft_*`)
    the task or mixture draws from (at a positive rate)."""
    t = seqio.get_mixture_or_task(task)
    drawn = [s for s in t.tasks if t.get_rate(s) > 0] if isinstance(t, seqio.Mixture) else [t]
    out = {}
    for sub in drawn:
        names = [f for f in sft_prompts.FAMILIES if sub.name.endswith("_" + f)]
        if sub.name.startswith("cm3leon_sft_") and names:
            vocab_dir = sub.output_features["targets"].vocabulary.directory
            out[max(names, key=len)] = os.path.dirname(vocab_dir.rstrip("/"))
    return out


def eval_split() -> str:
    """The split `train` evaluates on (train.eval_split, bound or its default)."""
    default = inspect.signature(trainer.train).parameters["eval_split"].default
    return gin.get_bindings(trainer.train).get("eval_split", default)


def check_eval_data(task: str, split: str) -> None:
    """Raises UserInputError when none of the SFT families `task` draws from has shards of
    `split`, the one the run evaluates on (or one that has them wrote no example): the run
    would train up to its first evaluation and fail there. A task of no SFT family is not
    checked."""
    families = _sft_families(task)
    missing = sorted({d for d in families.values() if not fs.exists(d)})
    if missing:
        raise MissingInputError(
            f"the SFT data folder {missing[0]!r}, which train.task={task!r} reads (SFT_DATA in "
            "gin_configs/runs/sft.gin), does not exist: make it with the sft_preprocess run "
            "mode, or give the folder it wrote.")
    for data_dir in sorted(set(families.values())):
        if not any(fs.isdir(os.path.join(data_dir, f)) for f in sft_prompts.FAMILIES):
            raise UserInputError(
                f"{data_dir!r} (SFT_DATA, which train.task={task!r} reads) holds no family "
                f"folder ({', '.join(sft_prompts.FAMILIES[:3])}, ...): it is not what the "
                "sft_preprocess run mode writes (a pretraining data folder?). Make the SFT "
                "data with gin_configs/runs/sft_preprocess.gin and give its MODEL_DIR.")
    with_split = {f: d for f, d in families.items()
                  if fs.glob(shards.shard_pattern(os.path.join(d, f), split))}
    for family, data_dir in with_split.items():
        sft_preprocess.check_has_examples(data_dir, family, split)
    if families and not with_split:
        folders = ", ".join(repr(d) for d in sorted(set(families.values())))
        raise UserInputError(
            f"the SFT data in {folders} has no {split!r} split for train.task={task!r}, and "
            f"the run evaluates on it (train.eval_split={split!r}, at the end and every "
            "train.eval_every steps): it would fail at its first evaluation. Give "
            f"sft_preprocess's source a {split!r} split (e.g. FormatSource.splits="
            f"{{'train': [...], {split!r}: [...]}}) and rerun it into a new folder, or bind "
            "train.eval_split='train' to evaluate on training examples.")


def task_vocab_dir(task: str) -> str:
    """The vocabulary folder a seqio task or mixture reads."""
    return seqio.get_mixture_or_task(task).output_features["targets"].vocabulary.directory


def check_vocabulary(base_vocab_dir: str, task: str) -> None:
    """Raises when the task's vocabulary files differ from the base model's."""
    mine = task_vocab_dir(task)
    for name in vocabulary_files(base_vocab_dir):
        a, b = os.path.join(base_vocab_dir, name), os.path.join(mine, name)
        if not fs.exists(a):
            raise MissingInputError(f"sft.base_vocab_dir={base_vocab_dir!r} has no {name}: give "
                                    "the vocab/ folder of the base model's pretraining data.")
        if not fs.exists(b) or fs.read_bytes(a) != fs.read_bytes(b):  # gs:// paths too.
            raise UserInputError(f"vocabulary mismatch: the base model's {base_vocab_dir!r} and "
                                 f"the SFT task {task!r}'s {mine!r} differ ({name}); run "
                                 "sft_preprocess with the base model's pretraining vocabulary.")


def check_base_record(base_model_dir: str, task: str) -> None:
    """Raises when the base run recorded another vocabulary than the task's (its trainer's
    `vocabulary.json`): base_vocab_dir may name the task's own folder, not the base's."""
    vocab = seqio.get_mixture_or_task(task).output_features["targets"].vocabulary
    mismatch = (isinstance(vocab, MultimodalVocabulary)
                and restore.vocabulary_mismatch(base_model_dir, vocab))
    if mismatch:
        raise UserInputError(f"the SFT task {task!r} reads the vocabulary in "
                             f"{vocab.directory!r}, and the base run {base_model_dir!r}: "
                             f"{mismatch}. Run sft_preprocess with the base model's "
                             "pretraining vocabulary.")


# MODEL_DIR/BASE_FILE: the base an SFT run started from, the folder and the step read.
BASE_FILE = "sft_base.json"


@gin.configurable(denylist=["model_dir"])
def sft(model_dir: str, base_model_dir: str = gin.REQUIRED,
        base_vocab_dir: str | None = None, base_step: int | None = None) -> dict[str, Any]:
    """Fine-tunes the base run's parameters on `train.task` into `model_dir`.

    The first start records the base it read (`BASE_FILE`: its folder and the step
    restored, which is an earlier one where the newest is unreadable); a resume reads no
    base and refuses one that differs from the record.

    Args:
      model_dir: this run's folder (checkpoints, metrics); never the base's.
      base_model_dir: the pretraining run's MODEL_DIR, or an export (`export` or
        `import_weights`: e.g. imported Chameleon weights); read only.
      base_vocab_dir: the vocab/ folder of the data the base was pretrained on, compared
        file by file with the task's; None: the base's own record of it (its trainer's
        `vocabulary.json`, an export's manifest), which is checked either way.
      base_step: which base checkpoint (None: the newest).
    Returns: the trainer's result, with `base`: the record.
    """
    check_not_base(model_dir, base_model_dir)
    check_base_step(base_step)
    task = gin.query_parameter("train.task")
    check_eval_data(task, eval_split())
    if resuming(model_dir):  # The base is not read again: it may even be gone.
        check_same_base(model_dir, base_model_dir, base_step)
        result = trainer.train(model_dir)
        return {**result, "base": read_base_record(model_dir)
                or {"model_dir": base_model_dir, "step": base_step}}
    restore.check_checkpoint(base_model_dir, base_step)  # A missing base first, by name.
    config = run_config.bind_decoder_config(base_model_dir, "this SFT run")
    if base_vocab_dir is not None:
        check_vocabulary(base_vocab_dir, task)
    elif restore.vocabulary_record(base_model_dir) is None:
        raise UserInputError(f"the base run {base_model_dir!r} records no vocabulary (a run "
                             "from before the records, or an import without one): give "
                             "sft.base_vocab_dir, the vocab/ folder of its pretraining data.")
    check_base_record(base_model_dir, task)
    used = {}

    def base_params(mesh):  # Laid out over the run's mesh: on a pod, no one host holds it.
        _, params, step = restore.restore_decoder(base_model_dir, base_step, _as_stored(
            base_model_dir, config), mesh)
        used.update(model_dir=fs.abspath(base_model_dir), step=step)
        if jax.process_index() == 0:
            fs.write_json(fs.join(model_dir, BASE_FILE), used)
        return jax.tree.map(lambda x: x.astype(config.weight_dtype), params)

    result = trainer.train(model_dir, init_params_from=base_params)
    return {**result, "base": used or read_base_record(model_dir)}


def check_base_step(base_step: Any) -> None:
    """UserInputError unless `base_step` is None or a step number (a quoted '700' would
    be reported as a step the base does not have)."""
    if base_step is not None and (isinstance(base_step, bool) or not isinstance(base_step, int)):
        raise UserInputError(f"sft.base_step={base_step!r}: give a step number (700, not "
                             "'700') or None for the newest.")


def resuming(model_dir: str) -> bool:
    """Whether the SFT run in `model_dir` has a committed checkpoint to resume from."""
    return bool(checkpoints.finished_steps(fs.join(model_dir, "checkpoints")))


def read_base_record(model_dir: str) -> dict | None:
    """The base the SFT run in `model_dir` started from (None: a run from before records)."""
    path = fs.join(model_dir, BASE_FILE)
    return fs.read_json(path) if fs.exists(path) else None


def check_same_base(model_dir: str, base_model_dir: str, base_step: int | None) -> None:
    """ModelDirMismatchError when the SFT run in `model_dir` started from another base than
    `base_model_dir` (at `base_step`, where one is given): resuming it would go on
    fine-tuning the other one under this one's name."""
    record = read_base_record(model_dir)
    if record is None:
        return
    same_dir = fs.abspath(base_model_dir) == record["model_dir"]
    if same_dir and base_step in (None, record["step"]):
        return
    raise ModelDirMismatchError(
        f"the SFT run in {model_dir!r} started from {record['model_dir']!r} at step "
        f"{record['step']} ({BASE_FILE}), and this run names sft.base_model_dir="
        f"{base_model_dir!r}{f', sft.base_step={base_step}' if base_step is not None else ''}:"
        " rerunning it resumes that fine-tune. Give the new base a MODEL_DIR of its own, or "
        "name the recorded base.")


def _as_stored(base_model_dir: str, config: DecoderConfig) -> DecoderConfig | None:
    """The config to restore the base with: an export's own (its stored dtype; the
    parameters are cast after), a train run's `config`."""
    return None if params_checkpoint.is_export(base_model_dir) else config


def check_not_base(model_dir: str, base_model_dir: str) -> None:
    """Raises UserInputError when the SFT run's folder is the base run's, holds it or lies
    inside it, symbolic links followed (the SFT run would replace the base's config.gin or
    mix its checkpoints into the base's)."""
    if fs.overlap(model_dir, base_model_dir):
        raise UserInputError(
            f"sft MODEL_DIR {model_dir!r} is, holds or lies inside the base run's folder "
            f"{base_model_dir!r} (sft.base_model_dir): give the fine-tuned run a folder of its "
            "own, beside the base; the base is left untouched.")


def _preflight(model_dir: str) -> None:
    """`main.run` calls this before it writes MODEL_DIR/config.gin: refuses the base's folder
    and SFT data without the eval split, and binds the base's DecoderConfig so that this
    run's config.gin records the sizes it trains (what a later generate or eval run on it
    reads)."""
    bound = gin.get_bindings(sft)
    base = bound.get("base_model_dir")
    if base:
        check_not_base(model_dir, base)
        check_base_step(bound.get("base_step"))
        check_eval_data(gin.query_parameter("train.task"), eval_split())
        if resuming(model_dir):  # The sizes it trains: its own (the base may be gone).
            check_same_base(model_dir, base, bound.get("base_step"))
            run_config.bind_decoder_config(model_dir, "this SFT run")
        else:
            # A base folder that is not there (or holds no checkpoint) by name, before its
            # missing config.gin reads as the default sizes and its missing record as an
            # older run's.
            restore.check_checkpoint(base, bound.get("base_step"))
            run_config.bind_decoder_config(base, "this SFT run")


sft.preflight = _preflight
