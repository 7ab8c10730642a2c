"""Settings: one typed module, environment over config file over defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from elmreg.cli.main import cli
from elmreg.registry.errors import ConfigurationError
from elmreg.registry.settings import Settings, load_settings, setting_docs

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_use_embedded_services(tmp_path):
    settings = load_settings({"ELMREG_HOME": str(tmp_path)})
    assert settings.home == tmp_path
    assert settings.uses_embedded_database and settings.uses_embedded_s3
    assert settings.cache_path == tmp_path / "cache"
    assert settings.backbone == "google/gemma-3-270m"


def test_environment_wins_over_config_file(tmp_path):
    (tmp_path / "config.toml").write_text('s3_bucket = "from-file"\nembedder = "file-embedder"\n')
    settings = load_settings({"ELMREG_HOME": str(tmp_path), "ELMREG_S3_BUCKET": "from-env"})
    assert settings.s3_bucket == "from-env"
    assert settings.embedder == "file-embedder"


def test_explicit_config_path_and_overrides(tmp_path):
    config = tmp_path / "elsewhere.toml"
    config.write_text('database_url = "postgresql+psycopg://u@db/x"\ncache_dir = "~/elm-cache"\n')
    settings = load_settings({"ELMREG_HOME": str(tmp_path), "ELMREG_CONFIG": str(config)}, s3_bucket="cli")
    assert settings.database_url == "postgresql+psycopg://u@db/x" and not settings.uses_embedded_database
    assert settings.cache_path == Path("~/elm-cache").expanduser()
    assert settings.s3_bucket == "cli"


def test_unknown_key_in_config_file_is_a_clear_error(tmp_path):
    (tmp_path / "config.toml").write_text('s3_bukket = "typo"\n')
    with pytest.raises(ConfigurationError, match="unknown setting 's3_bukket'"):
        load_settings({"ELMREG_HOME": str(tmp_path)})


def test_missing_explicit_config_file(tmp_path):
    with pytest.raises(ConfigurationError, match="not a file"):
        load_settings({"ELMREG_HOME": str(tmp_path), "ELMREG_CONFIG": str(tmp_path / "nope.toml")})


def test_empty_variables_count_as_unset_and_values_are_normalised(tmp_path):
    (tmp_path / "config.toml").write_text('s3_bucket = "from-file"\n')
    environ = {"ELMREG_HOME": str(tmp_path), "ELMREG_S3_BUCKET": "", "ELMREG_LOG_LEVEL": "info"}
    settings = load_settings(environ)
    assert settings.s3_bucket == "from-file" and settings.log_level == "INFO"


@pytest.mark.parametrize(
    ("environ", "config", "message"),
    [
        (
            {"ELMREG_DEVICE": "gpu"},
            "",
            "invalid setting 'device' = 'gpu' (from ELMREG_DEVICE): use auto, cpu, cuda or cuda:N",
        ),
        (
            {},
            "s3_bucket = 1\n",
            "invalid setting 's3_bucket' = 1 (from {config}): input should be a valid string",
        ),
        ({}, 'home = "/elsewhere"\n', "'home' cannot be set in {config}"),
        ({}, "s3_bucket = \n", "cannot read config file {config}"),
        (
            {"ELMREG_DATABASE_URL": "mysql://me:hunter2@db/x"},
            "",
            "invalid setting 'database_url' = 'mysql://me:***@db/x' (from ELMREG_DATABASE_URL): use a PostgreSQL URL",
        ),
    ],
)
def test_invalid_values_are_one_line_errors(tmp_path, environ, config, message):
    (tmp_path / "config.toml").write_text(config)
    with pytest.raises(ConfigurationError) as raised:
        load_settings({"ELMREG_HOME": str(tmp_path), **environ})
    text = str(raised.value)
    assert message.format(config=tmp_path / "config.toml") in text and "\n" not in text
    assert "hunter2" not in text


def test_replace_validates_without_reading_the_environment_again(tmp_path):
    settings = load_settings({"ELMREG_HOME": str(tmp_path), "ELMREG_S3_BUCKET": "mine"})
    changed = settings.replace(device="cpu", cache_dir=tmp_path / "c")
    assert changed.device == "cpu" and changed.cache_path == tmp_path / "c" and changed.s3_bucket == "mine"
    with pytest.raises(ConfigurationError, match="invalid setting 'device' = 'tpu'"):
        settings.replace(device="tpu")


def test_cli_prints_an_invalid_setting_on_one_line_with_exit_code_2(tmp_path):
    result = CliRunner().invoke(
        cli, ["tasks", "list"], env={"ELMREG_HOME": str(tmp_path), "ELMREG_LOG_LEVEL": "loud"}
    )
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0 and "Traceback" not in result.output
    assert "invalid setting 'log_level' = 'loud' (from ELMREG_LOG_LEVEL): use one of DEBUG" in result.output


def test_every_setting_is_documented():
    names = {row[0] for row in setting_docs()}
    assert {"ELMREG_" + name.upper() for name in Settings.model_fields} <= names
    assert all(row[2] for row in setting_docs())


def test_no_other_module_reads_the_environment():
    readers = []
    for path in ROOT.glob("*/**/*.py"):
        # .venv and .venv-vllm hold installed packages, not elmreg's code.
        if any(part.startswith(".venv") for part in path.parts) or "tests" in path.parts:
            continue
        if path.name == "settings.py":
            continue
        if re.search(r"os\.environ|os\.getenv|getenv\(", path.read_text()):
            readers.append(str(path.relative_to(ROOT)))
    assert readers == []
