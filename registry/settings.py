"""Every setting elmreg reads, declared once.

Values come from, in order of precedence: ``ELMREG_*`` environment variables, then the optional TOML config
file (``$ELMREG_HOME/config.toml`` unless ``ELMREG_CONFIG`` names another), then the defaults below. This is
the only module that reads ``os.environ``; everything else receives a :class:`Settings`.

The config file uses the setting names without the prefix, in lower case::

    database_url = "postgresql+psycopg://elmreg@db.internal/elmreg"
    s3_endpoint_url = "https://s3.eu-west-1.amazonaws.com"
    s3_bucket = "team-experts"
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elmreg.registry.errors import ConfigurationError

ENV_PREFIX = "ELMREG_"
DEFAULT_BACKBONE = "google/gemma-3-270m"
DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"


def _setting(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"help": doc})


@dataclass(frozen=True)
class Settings:
    """elmreg's configuration. Build it with :func:`load_settings`; each field's ``help`` is its documentation."""

    home: Path = _setting(
        Path("~/.elmreg"), "Directory for embedded service data, caches and the config file."
    )
    database_url: str = _setting(
        "", "SQLAlchemy URL of a PostgreSQL with pgvector >= 0.6. Empty: the embedded PostgreSQL."
    )
    s3_endpoint_url: str = _setting(
        "", "S3 API endpoint (MinIO, SeaweedFS, AWS). Empty: the embedded SeaweedFS server."
    )
    s3_bucket: str = _setting("elmreg", "Bucket holding expert weights.")
    s3_prefix: str = _setting("", "Key prefix inside the bucket, e.g. 'team-a/'.")
    s3_region: str = _setting("us-east-1", "S3 region name (any value works for MinIO and SeaweedFS).")
    s3_access_key_id: str = _setting(
        "", "S3 access key. Empty with the embedded server: a key generated at first start."
    )
    s3_secret_access_key: str = _setting(
        "", "S3 secret key. Empty with the embedded server: a key generated at first start."
    )
    cache_dir: Path | None = _setting(
        None, "Cache for downloaded weights, converted backbones and datasets. Default: HOME/cache."
    )
    embedder: str = _setting(
        DEFAULT_EMBEDDER, "Sentence-transformers model for library samples and queries (name or path)."
    )
    backbone: str = _setting(
        DEFAULT_BACKBONE, "Default backbone for new tasks: Hugging Face hub id or local path."
    )
    device: str = _setting("auto", "Torch device for training and inference: auto, cpu, cuda, cuda:N.")
    manifest_dir: str = _setting(
        "",
        "Folder of task manifests (YAML lists of add-task specs) for nightly ingestion. Default: HOME/manifests.",
    )
    log_level: str = _setting("WARNING", "Python logging level of elmreg's own loggers.")

    @property
    def cache_path(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.home / "cache"

    @property
    def services_dir(self) -> Path:
        return self.home / "services"

    @property
    def uses_embedded_database(self) -> bool:
        return not self.database_url

    @property
    def uses_embedded_s3(self) -> bool:
        return not self.s3_endpoint_url

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def setting_docs() -> list[tuple[str, str, str]]:
    """Return ``(ENV_NAME, default, help)`` for every setting, for docs and ``--help`` output."""
    rows = [(ENV_PREFIX + "CONFIG", "HOME/config.toml", "Path of the optional TOML config file.")]
    for f in dataclasses.fields(Settings):
        default = "" if f.default is None else str(f.default)
        rows.append((ENV_PREFIX + f.name.upper(), default, f.metadata["help"]))
    return rows


def _coerce(name: str, raw: Any, target: Any) -> Any:
    if target in (Path, "Path", "Path | None"):
        return Path(str(raw)).expanduser()
    if not isinstance(raw, str):
        raise ConfigurationError(f"setting '{name}' must be a string, got {raw!r}")
    return raw


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build the settings from the environment, the config file and keyword overrides.

    Args:
        environ: The environment to read; ``os.environ`` when None (tests pass their own mapping).
        **overrides: Field values that win over everything else (used by CLI options such as ``--home``).

    Returns:
        The frozen settings.

    Raises:
        ConfigurationError: The config file is unreadable or names an unknown setting.
    """
    env = os.environ if environ is None else environ
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    values: dict[str, Any] = {}

    home_raw = overrides.get("home") or env.get(ENV_PREFIX + "HOME") or str(Settings.home)
    home = Path(str(home_raw)).expanduser()
    config_path = Path(env.get(ENV_PREFIX + "CONFIG") or home / "config.toml").expanduser()
    if config_path.is_file():
        try:
            file_values = tomllib.loads(config_path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigurationError(f"cannot read config file {config_path}: {exc}") from exc
        for key, raw in file_values.items():
            if key not in fields or key == "home":
                raise ConfigurationError(
                    f"unknown setting '{key}' in {config_path}; known: {', '.join(sorted(set(fields) - {'home'}))}"
                )
            values[key] = _coerce(key, raw, fields[key].type)
    elif ENV_PREFIX + "CONFIG" in env:
        raise ConfigurationError(f"{ENV_PREFIX}CONFIG points to {config_path}, which is not a file")

    for name, f in fields.items():
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = _coerce(name, raw, f.type)
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["home"] = home
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigurationError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    return Settings(**values)
