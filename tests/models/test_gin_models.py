"""The gin model-size files bind exactly the released T5 v1.1 dimensions."""

import pathlib

import gin
import pytest

from t5align.models import t5

GIN_DIR = pathlib.Path(__file__).resolve().parents[2] / "gin" / "models" / "t5_1_1"


@pytest.mark.parametrize("size", sorted(t5.T5_1_1_SIZES))
def test_size_file_matches_released_dimensions(size):
  with gin.unlock_config():
    gin.clear_config()
    gin.parse_config_files_and_bindings([str(GIN_DIR / f"{size}.gin")], [])
    config = gin.query_parameter(f"%T5_1_1_{size.upper()}").scoped_configurable_fn()
    gin.clear_config()
  assert config == t5.T5_1_1_SIZES[size]


def test_sizes_compose_with_unscoped_run_settings():
  with gin.unlock_config():
    gin.clear_config()
    gin.parse_config_files_and_bindings(
        [str(GIN_DIR / "large.gin"), str(GIN_DIR / "xxl.gin")],
        ["t5.T5Config.dropout_rate = 0.1", "xxl/t5.T5Config.dtype = 'float32'"])
    large = gin.query_parameter("%T5_1_1_LARGE").scoped_configurable_fn()
    xxl = gin.query_parameter("%T5_1_1_XXL").scoped_configurable_fn()
    gin.clear_config()
  assert large.emb_dim == 1024 and xxl.emb_dim == 4096
  assert large.dropout_rate == xxl.dropout_rate == 0.1
  assert large.dtype == "bfloat16" and xxl.dtype == "float32"
