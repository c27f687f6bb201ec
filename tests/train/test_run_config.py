"""A train run's decoder sizes read back from its MODEL_DIR/config.gin (train/run_config.py).

No training here: config.gin files are written by `run_config.write` from gin bindings (the
form the command line writes) or by hand; restoring a checkpoint through them is covered by
the export and eval command-line tests, whose run files bind no size.
"""

import gin
import pytest

from cm3leon_jax.errors import UserInputError
from cm3leon_jax.model.config import DecoderConfig
from cm3leon_jax.train import run_config

SIZES = {"vocab_size": 896, "num_layers": 3, "d_model": 96, "num_heads": 4, "mlp_dim": 384,
         "max_length": 512, "norm": "rmsnorm", "attention_impl": "chunked"}


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _bind(**values):
    with gin.unlock_config():
        for key, value in values.items():
            gin.bind_parameter(f"DecoderConfig.{key}", value)


@pytest.fixture
def trained(tmp_path, clean_gin):
    """A MODEL_DIR whose config.gin gin itself wrote with SIZES bound (and other bindings)."""
    _bind(**SIZES)
    gin.parse_config("import cm3leon_jax.train.optimizer\nmake_optimizer.b1 = 0.9")
    run_config.write(str(tmp_path))
    gin.clear_config()
    return str(tmp_path)


def test_the_sizes_come_from_config_gin(trained):
    config = run_config.decoder_config(trained)
    assert config == DecoderConfig(**SIZES)


def test_agreeing_sizes_and_any_runtime_binding_are_accepted(trained):
    _bind(num_layers=3, d_model=96, attention_impl="xla", scan_unroll=2)
    config = run_config.decoder_config(trained)
    assert (config.num_layers, config.attention_impl, config.scan_unroll) == (3, "xla", 2)
    assert config.mlp_dim == 384 and config.norm == "rmsnorm"


def test_a_size_bound_otherwise_is_one_error_naming_both(trained):
    _bind(num_layers=2, mlp_dim=384)
    with pytest.raises(UserInputError, match=r"num_layers: trained 3, bound 2\. .*config\.gin"):
        run_config.decoder_config(trained, "this eval run")
    gin.clear_config()
    # A field config.gin leaves unbound was trained at DecoderConfig's default.
    _bind(qk_norm=True)
    with pytest.raises(UserInputError, match="qk_norm: trained False, bound True"):
        run_config.decoder_config(trained)


def test_bind_decoder_config_makes_gin_build_the_trained_decoder(trained):
    config = run_config.bind_decoder_config(trained)
    assert DecoderConfig() == config == DecoderConfig(**SIZES)
    # Bound, the sizes agree with the file: reading it again is no conflict.
    assert run_config.decoder_config(trained) == config


def test_without_config_gin_gin_alone_decides(tmp_path, clean_gin):
    _bind(num_layers=5)
    assert run_config.stored_bindings(str(tmp_path)) is None
    assert run_config.decoder_config(str(tmp_path)) == DecoderConfig(num_layers=5)


def test_an_unreadable_config_gin_is_named(tmp_path, clean_gin):
    (tmp_path / "config.gin").write_text("DecoderConfig.num_layers = %LAYERS\n")
    with pytest.raises(UserInputError, match="not a literal value"):
        run_config.decoder_config(str(tmp_path))
    (tmp_path / "config.gin").write_text("DecoderConfig.num_wings = 2\n")
    with pytest.raises(UserInputError, match="num_wings"):
        run_config.decoder_config(str(tmp_path))


def test_a_model_dir_that_cannot_be_made_is_named(tmp_path, clean_gin):
    """Was a PermissionError / NotADirectoryError traceback from inside main.run."""
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserInputError, match=r"cannot create MODEL_DIR .*a_file/run"):
        run_config.write(str(tmp_path / "a_file" / "run"))
