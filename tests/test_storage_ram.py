"""The program's files on a non-local file system: TensorFlow's `ram://` (offline, in memory).

`ram://` lives in this process, so everything runs in-process: the entry point's
config.gin, metrics (jsonl and TensorBoard), the tokenized data folder (vocabulary,
shards, manifest) read by the trainer, the memory bank and the ScaNN index. Orbax
checkpoints are the one exception: orbax goes through etils.epath, which knows
gs:// but not ram:// (`KeyError: 'ram://'`), so the training run here keeps its
MODEL_DIR local and reads its data from ram://.
"""

import json
import os
import sys
import uuid

import gin
import numpy as np
import pytest

from cm3leon_jax import fs
from cm3leon_jax import main as main_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train"))
import train_testlib  # noqa: E402


def ram(name: str) -> str:
    return f"ram://{name}_{uuid.uuid4().hex[:8]}"


def test_entry_point_writes_config_and_runs_on_ram():
    model_dir = ram("run")
    gin.clear_config()
    try:
        assert main_lib.main(["--gin_file=tests/launch/processes.gin",
                              f"--gin.MODEL_DIR='{model_dir}'",
                              "--gin.processes_mode.tag='ram'"]) == 0
    finally:
        gin.clear_config()
    assert "processes_mode.tag = 'ram'" in fs.read_text(fs.join(model_dir, "config.gin"))
    assert fs.read_json(fs.join(model_dir, "process_0.json"))["tag"] == "ram"


def test_metrics_and_tensorboard_on_ram():
    from cm3leon_jax.train import metrics
    model_dir = ram("metrics")
    fs.makedirs(model_dir)
    writer = metrics.MetricsWriter(model_dir, console=False)
    writer.write(1, {"loss": 2.5})
    writer.write(2, {"loss": 2.0})
    writer.close()
    rows = [json.loads(line) for line in fs.read_text(fs.join(model_dir, "metrics.jsonl"))
            .splitlines()]
    assert rows == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]
    assert any(n.startswith("events.out.tfevents") for n in fs.listdir(model_dir))


def test_memory_bank_and_index_on_ram():
    from cm3leon_jax.retrieval import index as index_lib
    from cm3leon_jax.retrieval import memory_bank
    root = ram("bank")
    vectors = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    writer = memory_bank.MemoryBankWriter(fs.join(root, "bank"), docs_per_shard=128)
    for i, v in enumerate(vectors):
        writer.add(f"doc{i}", v, multimodal=i % 2 == 0, tokens=np.arange(i % 4 + 1))
    writer.close()
    bank = memory_bank.MemoryBank(fs.join(root, "bank"))
    assert len(bank) == 300 and bank.num_shards == 3
    np.testing.assert_array_equal(bank.vectors(np.array([0, 299])), vectors[[0, 299]])
    index = index_lib.Index.build(vectors, index_lib.IndexConfig(algorithm="tree_ah",
                                                                 num_leaves=8,
                                                                 leaves_to_search=8))
    loaded = index_lib.load_index(index.save(fs.join(root, "index")))
    np.testing.assert_array_equal(loaded.search(vectors[:5], 3)[0], index.search(vectors[:5], 3)[0])


@pytest.fixture(scope="module")
def ram_corpus():
    root = ram("corpus")
    return root, train_testlib.build_corpus(root)


def test_training_reads_its_data_from_ram(ram_corpus, tmp_path):
    """Vocabulary and shards on ram://; the trainer reads them (MODEL_DIR local: orbax)."""
    path, vocab = ram_corpus
    assert fs.isdir(fs.join(path, "vocab")) and fs.glob(fs.join(path, "train-*.tfrecord"))
    model_dir = str(tmp_path / "run")
    train_testlib.run_in_process(train_testlib.bindings(
        model_dir, path, vocab, **{"train.num_steps": 2, "Checkpointer.save_every": 2}))
    assert sorted(train_testlib.losses(model_dir)) == [1, 2]


def test_orbax_checkpoints_refuse_ram_with_a_clear_error():
    """Orbax writes through etils.epath + tensorstore (local, gs://, s3://), not tf.io.gfile,
    so TensorFlow's ram:// cannot hold checkpoints: one UserInputError, nothing written."""
    from cm3leon_jax.errors import UserInputError
    from cm3leon_jax.train import checkpoints
    from cm3leon_jax.vocab import vqgan_checkpoint

    root = f"ram://ckpt_{uuid.uuid4().hex[:8]}"
    with pytest.raises(UserInputError, match=r"orbax does not speak ram://.*gs://"):
        checkpoints.Checkpointer(fs.join(root, "checkpoints"))
    assert not fs.exists(root)
    fs.makedirs(fs.join(root, "vq", "checkpoints", "1"))  # Looks like a tokenizer run.
    with pytest.raises(UserInputError, match="orbax does not speak ram://"):
        vqgan_checkpoint.restore_params(fs.join(root, "vq"))
