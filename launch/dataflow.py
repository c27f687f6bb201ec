r"""Run the Beam preprocessing (`gin_configs/runs/preprocess.gin`) on Google Cloud Dataflow.

    python -m launch.dataflow gin_configs/runs/preprocess.gin gs://BUCKET/data \
        --project=PROJECT --region=us-central1 --temp_location=gs://BUCKET/tmp \
        --gin.IMAGE_TOKENIZER_DIR="'gs://BUCKET/image_tokenizer'" \
        --gin.ENCODER_DIR="'gs://BUCKET/clip/encoder'" [--max_num_workers=64] \
        [--machine_type=n2-highmem-8] [--sdk_container_image=IMAGE] [--dry_run]

This machine runs the driver (`python -m cm3leon_jax.main` with the preprocess gin file):
it trains the vocabulary if the output has none, submits the tokenize pipeline (and,
with retrieval, the neighbors pipeline) to Dataflow with `preprocess.runner =
'DataflowRunner'` and the pipeline options below, waits for them, builds the memory
bank and index, and writes the manifest. MODEL_DIR (the output data folder) and every
input folder must be `gs://`: Dataflow workers read and write them.

The workers need this package: by default Beam builds it from `setup.py`
(`--setup_file`) and installs it on every worker at start-up (minutes: it pulls
TensorFlow and JAX); `--sdk_container_image` names a prebuilt image instead.

This machine needs Beam's Dataflow runner, the `dataflow` extra (`pip install -e
'.[dataflow]'`; `make install` leaves it out): without it the launch stops before the
driver does any work.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from typing import Sequence

from launch import common

# What Beam's DataflowRunner imports to submit a job: it fails without apache-beam[gcp].
DATAFLOW_CLIENT = "apache_beam.runners.dataflow.internal.apiclient"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.dataflow",
                                     description=__doc__.split("\n\n")[0])
    common.add_run_args(parser, "the output data folder (gs://)", "gin_configs/runs/preprocess.gin")
    parser.add_argument("--project", required=True)
    parser.add_argument("--region", required=True)
    parser.add_argument("--temp_location", required=True, help="a gs:// folder for Dataflow")
    parser.add_argument("--job_name", default=None,
                        help="Dataflow job name (default: from MODEL_DIR's last folder)")
    parser.add_argument("--max_num_workers", type=int, default=None)
    parser.add_argument("--machine_type", default=None, help="worker machine type")
    parser.add_argument("--sdk_container_image", default=None,
                        help="a worker image with this package installed")
    return parser


def job_name(model_dir: str) -> str:
    """A Dataflow job name ([-a-z0-9], starting with a letter) from the output folder."""
    tail = model_dir.rstrip("/").rsplit("/", 1)[-1].lower()
    return "cm3leon-preprocess-" + (re.sub(r"[^a-z0-9]+", "-", tail).strip("-") or "data")


def pipeline_options(args) -> list[str]:
    """Beam's options for the Dataflow runner."""
    options = [f"--project={args.project}", f"--region={args.region}",
               f"--temp_location={args.temp_location}",
               f"--job_name={args.job_name or job_name(args.model_dir)}"]
    if args.sdk_container_image:
        options.append(f"--sdk_container_image={args.sdk_container_image}")
    else:
        options.append(f"--setup_file={os.path.join(common.REPO, 'setup.py')}")
    if args.max_num_workers:
        options.append(f"--max_num_workers={args.max_num_workers}")
    if args.machine_type:
        options.append(f"--worker_machine_type={args.machine_type}")
    return options


def check_dataflow_runner() -> None:
    """Refuses to start the driver where Beam cannot submit to Dataflow: it would train the
    vocabulary and only then fail at the first submission."""
    try:
        importlib.import_module(DATAFLOW_CLIENT)
    except ImportError as e:
        raise common.LaunchError(
            f"Beam's Dataflow runner is not installed here ({e}); install the dataflow extra, "
            "pip install -e '.[dataflow]' (apache-beam[gcp]), then launch again") from None


def driver_argv(args, python: str) -> list[str]:
    """argv of the driver: the preprocess run mode, pointed at Dataflow."""
    bindings = {"preprocess.runner": "'DataflowRunner'",
                "preprocess.pipeline_options": repr(pipeline_options(args))}
    return common.main_argv(python, [args.gin_file, *args.extra_gin_files], args.model_dir,
                            args.overrides, bindings)


def launch(argv: Sequence[str] | None = None) -> int:
    args = common.parse(build_parser(), argv)
    common.check_gin_files([args.gin_file, *args.extra_gin_files])
    for name, path in (("MODEL_DIR", args.model_dir), ("--temp_location", args.temp_location)):
        if not path.startswith("gs://"):
            raise common.LaunchError(f"{name} {path!r} is not a gs:// folder; Dataflow "
                                     "workers can only reach cloud storage")
    if args.job_name and not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", args.job_name):
        raise common.LaunchError(f"--job_name={args.job_name!r}: Dataflow takes lower-case "
                                 "letters, digits and '-', starting with a letter and not "
                                 "ending with '-'")
    if not args.dry_run:
        check_dataflow_runner()
    common.Runner(args.dry_run).run(driver_argv(args, sys.executable))
    return 0


if __name__ == "__main__":
    raise SystemExit(common.run_main(launch))
