"""Settings: one typed module, environment over config file over defaults."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

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


def test_every_setting_is_documented():
    names = {row[0] for row in setting_docs()}
    assert {"ELMREG_" + f.name.upper() for f in dataclasses.fields(Settings)} <= names
    assert all(row[2] for row in setting_docs())


def test_no_other_module_reads_the_environment():
    readers = []
    for path in ROOT.glob("*/**/*.py"):
        if ".venv" in path.parts or "tests" in path.parts or path.name == "settings.py":
            continue
        if re.search(r"os\.environ|os\.getenv|getenv\(", path.read_text()):
            readers.append(str(path.relative_to(ROOT)))
    assert readers == []
