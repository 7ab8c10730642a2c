"""Every setting elmreg reads, declared once (a field of :class:`Settings` with a one-line description).

Values come from, in order of precedence: keyword overrides (CLI options such as ``--home``), ``ELMREG_*``
environment variables, the optional TOML config file (``$ELMREG_HOME/config.toml`` unless ``ELMREG_CONFIG``
names another), then the defaults below. pydantic-settings merges those sources and pydantic validates the
result; a bad value is a :class:`ConfigurationError` of one line naming the setting, where it came from and what
to write instead. This is the only module that reads ``os.environ``; everything else receives a :class:`Settings`.

The config file uses the setting names without the prefix, in lower case::

    database_url = "postgresql+psycopg://elmreg@db.internal/elmreg"
    s3_endpoint_url = "https://s3.eu-west-1.amazonaws.com"
    s3_bucket = "team-experts"
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from elmreg.registry.errors import ConfigurationError

ENV_PREFIX = "ELMREG_"
DEFAULT_BACKBONE = "google/gemma-3-270m"
DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
# Not a field: it says where the other settings are read from. (name, default, help) as in setting_docs().
CONFIG_SETTING = (ENV_PREFIX + "CONFIG", "HOME/config.toml", "Path of the optional TOML config file.")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Not a field either, and not for users: the fault-injection tests set it ("<point>:<folder>") to stop a process at
# a named point so that they can kill it exactly there (registry/pause_points.py). Unset, nothing pauses.
PAUSE_SETTING = ENV_PREFIX + "TEST_PAUSE"

# The environment and config-file sources of the load_settings() call in progress. BaseSettings asks its class
# for sources (settings_customise_sources), so they are handed over here; a ContextVar keeps threads apart.
_loading_sources: ContextVar[tuple[PydanticBaseSettingsSource, ...]] = ContextVar(
    "elmreg_settings_sources", default=()
)


class Settings(BaseSettings):
    """elmreg's configuration. Build it with :func:`load_settings`; ``Settings(...)`` itself only validates the
    values it is given. Each field's ``description`` is its documentation (``elmreg config`` lists them)."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid", validate_default=True)

    home: Path = Field(
        Path("~/.elmreg"), description="Directory for embedded service data, caches and the config file."
    )
    database_url: str = Field(
        "", description="SQLAlchemy URL of a PostgreSQL with pgvector >= 0.8. Empty: the embedded PostgreSQL."
    )
    s3_endpoint_url: str = Field(
        "", description="S3 API endpoint (MinIO, SeaweedFS, AWS). Empty: the embedded SeaweedFS server."
    )
    s3_bucket: str = Field("elmreg", description="Bucket holding expert weights.")
    s3_prefix: str = Field("", description="Key prefix inside the bucket, e.g. 'team-a/'.")
    s3_region: str = Field(
        "us-east-1", description="S3 region name (any value works for MinIO and SeaweedFS)."
    )
    s3_access_key_id: str = Field(
        "", description="S3 access key. Empty with the embedded server: a key generated at first start."
    )
    s3_secret_access_key: str = Field(
        "", description="S3 secret key. Empty with the embedded server: a key generated at first start."
    )
    cache_dir: Path | None = Field(
        None,
        description="Cache for downloaded weights, converted backbones and datasets. Default: HOME/cache.",
    )
    embedder: str = Field(
        DEFAULT_EMBEDDER,
        description="Sentence-transformers model for library samples and queries (name or path).",
    )
    backbone: str = Field(
        DEFAULT_BACKBONE, description="Default backbone for new tasks: Hugging Face hub id or local path."
    )
    device: str = Field(
        "auto", description="Torch device for training and inference: auto, cpu, cuda, cuda:N."
    )
    manifest_dir: str = Field(
        "",
        description="Folder of task manifests (YAML lists of add-task specs) for nightly ingestion. Default: HOME/manifests.",
    )
    log_level: str = Field("WARNING", description="Python logging level of elmreg's own loggers.")
    # The library at scale (benchmarks/library_scale.py measured each; README "Benchmarks").
    routing_ef_search: int = Field(
        100, ge=1, le=1000, description="HNSW candidates per query (pgvector hnsw.ef_search) for routing."
    )
    routing_iterative_scan: Literal["strict_order", "relaxed_order", "off"] = Field(
        "strict_order",
        description="pgvector iterative scan for queries whose candidates are all filtered out (off: exact scan).",
    )
    routing_max_scan_tuples: int = Field(
        20000,
        ge=1,
        description="Index tuples such a query may visit before an exact scan answers it instead.",
    )
    routing_parallel_connections: int = Field(
        2,
        ge=1,
        le=64,
        description="Pooled connections the Q queries of one decision are split over (1: no split).",
    )
    routing_prefer_alias: str | None = Field(
        None,
        description="Route only to each task's expert of this alias where the task has one (e.g. prod); "
        "tasks without it, and merges, keep all their experts.",
    )
    library_index_type: Literal["vector", "halfvec", "bit"] = Field(
        "vector",
        description="Type the HNSW index compares in: vector (float32), halfvec (float16, half the index size) "
        "or bit (binary quantization by Hamming distance, a sixth of the index size, re-ranked exactly).",
    )
    routing_rerank: int = Field(
        100,
        ge=1,
        le=1000,
        description="With the bit index: Hamming-nearest candidates per query re-ranked by the exact inner product.",
    )
    library_build_memory: str = Field(
        "2GB",
        description="maintenance_work_mem for HNSW builds; the graph must fit (~2 GB per 1M 384-d entries).",
    )
    library_build_workers: int = Field(
        2, ge=0, le=64, description="max_parallel_maintenance_workers for HNSW builds (0: serial)."
    )
    library_hnsw_m: int = Field(
        16,
        ge=2,
        le=100,
        description="HNSW links per node (pgvector m); larger: better recall, slower build, larger index. "
        "Applies to indexes built from now on ('elmreg library reindex' rebuilds).",
    )
    library_hnsw_ef_construction: int = Field(
        64,
        ge=4,
        le=1000,
        description="HNSW candidate list while building (pgvector ef_construction, at least 2 x m).",
    )

    # The engine that answers prompts (inference/engine.py: peft; inference/vllm_engine.py: vllm).
    engine: Literal["peft", "vllm"] = Field(
        "peft",
        description="Engine that answers: peft (in-process, every expert kind) or vllm (LoRA experts and base, "
        "by a vLLM server).",
    )
    vllm_url: str = Field(
        "",
        description="Base URL of a running vLLM OpenAI server on this machine, e.g. http://127.0.0.1:8801. "
        "Empty: elmreg starts one on a loopback port when the vllm engine is used.",
    )
    vllm_api_key: str = Field("", description="API key of that vLLM server (empty: none).")
    vllm_python: str = Field(
        "",
        description="Python of the virtual environment vLLM is installed in, for the vLLM server elmreg "
        "starts. Empty: .venv-vllm in the elmreg checkout (made by the Makefile).",
    )
    vllm_max_loras: int = Field(
        4,
        ge=1,
        le=256,
        description="LoRA experts the started vLLM server keeps in a batch at once (--max-loras).",
    )
    vllm_max_lora_rank: int = Field(
        16,
        ge=1,
        le=512,
        description="Largest LoRA rank the vLLM server takes (--max-lora-rank); experts above it are refused.",
    )
    vllm_memory_utilization: float = Field(
        0.3,
        gt=0,
        le=1,
        description="Share of accelerator memory the started vLLM server reserves for weights and KV cache "
        "(--gpu-memory-utilization; on CPU builds, the share of RAM for the KV cache).",
    )
    vllm_start_timeout: float = Field(
        300, gt=0, description="Seconds to wait for a started vLLM server to report healthy."
    )

    @field_validator("home", "cache_dir")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("database_url")
    @classmethod
    def _postgresql_url(cls, value: str) -> str:
        example = "postgresql+psycopg://user:password@host:5432/db, or nothing for the embedded server"
        if value and not value.startswith("postgresql"):
            raise ValueError(f"use a PostgreSQL URL such as {example}")
        if value:
            # Parsed and its driver loaded now, so that a mistyped port or driver is this one line naming the
            # setting, not a traceback from the first verb that opens the database.
            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import ArgumentError

            try:
                make_url(value).get_dialect().import_dbapi()
            except (ArgumentError, ValueError, ImportError) as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ValueError(
                    f"not a usable PostgreSQL URL ({reason}); use one such as {example}"
                ) from None
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not re.match(r"https?://", value):
            raise ValueError("use an http:// or https:// URL, or nothing for the embedded server")
        return value

    @field_validator("device")
    @classmethod
    def _torch_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("use auto, cpu, cuda or cuda:N")
        return value

    @field_validator("library_build_memory")
    @classmethod
    def _memory_size(cls, value: str) -> str:
        if not re.fullmatch(r"\d+\s*(kB|MB|GB|TB)", value.strip()):
            raise ValueError("use a PostgreSQL memory size such as 512MB or 2GB")
        return value.strip()

    @field_validator("library_hnsw_ef_construction")
    @classmethod
    def _graph_candidates(cls, value: int, info: ValidationInfo) -> int:
        m = info.data.get("library_hnsw_m")
        if m is not None and value < 2 * m:
            raise ValueError(f"pgvector needs at least 2 x library_hnsw_m ({2 * m})")
        return value

    @field_validator("vllm_url")
    @classmethod
    def _vllm_url(cls, value: str) -> str:
        if value and not re.match(r"https?://", value):
            raise ValueError("use an http:// or https:// URL, or nothing to let elmreg start vLLM")
        return value.rstrip("/")

    @field_validator("log_level")
    @classmethod
    def _logging_level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"use one of {', '.join(LOG_LEVELS)}")
        return value.upper()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Arguments win; then what load_settings() found. No .env file and no secrets directory: elmreg reads
        # exactly the environment and the one config file it documents.
        return (init_settings, *_loading_sources.get())

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
        """A copy with ``changes`` applied and validated (the environment and config file are not read again).

        Raises:
            ConfigurationError: A changed value is invalid or names no setting.
        """
        return _validated(lambda: type(self)(**{**dict(self), **changes}), lambda name: "the arguments")


class _EnvironSource(PydanticBaseSettingsSource):
    """The ``ELMREG_<NAME>`` variables of one environment mapping; an empty variable counts as unset."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]):
        super().__init__(settings_cls)
        self.environ = environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.environ.get(ENV_PREFIX + field_name.upper()) or None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values = {}
        for name, field in self.settings_cls.model_fields.items():
            value, key, _ = self.get_field_value(field, name)
            if value is not None:
                values[key] = value
        return values


def setting_docs() -> list[tuple[str, str, str]]:
    """Return ``(ENV_NAME, default, help)`` for every setting, for docs and ``--help`` output."""
    rows = [CONFIG_SETTING]
    for name, field in Settings.model_fields.items():
        default = "" if field.default is None else str(field.default)
        rows.append((ENV_PREFIX + name.upper(), default, field.description or ""))
    return rows


def _config_file_source(path: Path, explicit: bool) -> TomlConfigSettingsSource | None:
    if not path.is_file():
        if explicit:
            raise ConfigurationError(f"{ENV_PREFIX}CONFIG points to {path}, which is not a file")
        return None
    try:
        source = TomlConfigSettingsSource(Settings, toml_file=path)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"cannot read config file {path}: {exc}") from exc
    if "home" in source.toml_data:
        raise ConfigurationError(
            f"'home' cannot be set in {path}, which is read from the home: set {ENV_PREFIX}HOME or --home instead"
        )
    return source


def _shown(name: str, value: Any) -> str:
    """A value as an error message may show it: never a secret, nor the password inside a URL."""
    if name in ("s3_access_key_id", "s3_secret_access_key", "vllm_api_key"):
        return "(hidden)"
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", repr(value))


def _validated(build: Callable[[], Settings], origin: Callable[[str], str]) -> Settings:
    """``build()``, with pydantic's validation errors turned into one line that names the setting, where its
    value came from (``origin(name)``) and what to write instead."""
    try:
        return build()
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        name = str(first["loc"][0]) if first["loc"] else "?"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        if first["type"] == "extra_forbidden":
            known = ", ".join(n for n in Settings.model_fields if n != "home")
            message = f"unknown setting '{name}' in {origin(name)}; known: {known}"
        else:
            # A validator's ValueError says how to fix it; pydantic's own messages say what type is expected.
            problem = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]
            problem = problem[:1].lower() + problem[1:]
            message = (
                f"invalid setting '{name}' = {_shown(name, first['input'])} (from {origin(name)}): {problem}"
            )
        raise ConfigurationError(message + more) from None


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build the settings from the environment, the config file and keyword overrides.

    Args:
        environ: The environment to read; ``os.environ`` when None (tests pass their own mapping).
        **overrides: Field values that win over everything else (used by CLI options such as ``--home``);
            None means "not given".

    Returns:
        The frozen settings.

    Raises:
        ConfigurationError: The config file is unreadable or names an unknown setting, or a value is invalid.
    """
    env = os.environ if environ is None else environ
    overrides = {name: value for name, value in overrides.items() if value is not None}
    # The config file's place depends on the home, so the home comes from the arguments or the environment only.
    default_home = Settings.model_fields["home"].default
    home = Path(str(overrides.get("home") or env.get(ENV_PREFIX + "HOME") or default_home)).expanduser()
    config_path = Path(env.get(ENV_PREFIX + "CONFIG") or home / "config.toml").expanduser()
    config = _config_file_source(config_path, explicit=bool(env.get(ENV_PREFIX + "CONFIG")))

    def origin(name: str) -> str:
        if name in overrides:
            return "the arguments"
        if env.get(ENV_PREFIX + name.upper()):
            return ENV_PREFIX + name.upper()
        return str(config_path) if config is not None and name in config.toml_data else "the defaults"

    sources = (_EnvironSource(Settings, env), *([config] if config is not None else []))
    token = _loading_sources.set(sources)
    try:
        return _validated(lambda: Settings(**overrides), origin)
    finally:
        _loading_sources.reset(token)


def pause_request() -> tuple[str, Path] | None:
    """The pause point and barrier folder that ``ELMREG_TEST_PAUSE`` names, or None (always, outside the tests).

    Read from the environment at each call rather than from :class:`Settings`: it belongs to one process (the
    worker a test is about to kill), never to a config file, and must not show up in ``elmreg config``.
    """
    point, _, folder = os.environ.get(PAUSE_SETTING, "").partition(":")
    return (point, Path(folder)) if point and folder else None


def child_environ(**extra: str) -> dict[str, str]:
    """The environment for a server process elmreg starts (vLLM): this process's own, plus ``extra``."""
    return {**os.environ, **extra}
