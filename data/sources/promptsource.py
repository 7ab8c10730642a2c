"""promptsource's prompt collection (the T0/P3 templates), read from the ``promptsource`` sdist on the package index.

promptsource itself cannot be installed on Python 3.11 (it needs Python < 3.10), but its sdist (about 230 kB)
carries every ``templates.yaml``. elmreg downloads it once with pip into its cache, like the BIG-bench sdist, and
extracts the template files; :func:`~elmreg.data.prompts.load_promptsource_templates` reads any of them.

Layout of the extracted folder (``<cache>/promptsource/templates``), as in promptsource's repository::

    super_glue/boolq/templates.yaml        a dataset with subsets: one folder per subset
    cosmos_qa/templates.yaml               a dataset without subsets
    Zaid/coqa_expanded/templates.yaml      a user-namespaced dataset
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from elmreg.registry.errors import ServiceError

VERSION = "0.2.3"
SDIST = f"promptsource=={VERSION}"
_TEMPLATES_IN_TAR = "/promptsource/templates/"
TEMPLATE_FILE = "templates.yaml"


def _download_sdist(downloads: Path) -> Path:
    downloads.mkdir(parents=True, exist_ok=True)
    found = sorted(downloads.glob(f"promptsource-{VERSION}.tar.gz"))
    if found:
        return found[0]
    # --python-version 3.9: the package declares Python < 3.10, and pip would otherwise find no matching release.
    # --no-binary :all: takes the sdist (the only file with the templates).
    command = [
        *(sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"),
        *("--python-version", "3.9", "--retries", "2", "--timeout", "30", SDIST, "-d", str(downloads)),
    ]
    print(
        f"elmreg: downloading promptsource's templates ({SDIST}, 230 kB, once) into {downloads}",
        file=sys.stderr,
    )
    if subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr).returncode != 0:
        raise ServiceError(f"could not download {SDIST} with pip; check access to the package index")
    found = sorted(downloads.glob(f"promptsource-{VERSION}.tar.gz"))
    if not found:
        raise ServiceError(f"pip reported success but no promptsource sdist is in {downloads}")
    return found[0]


def _extract_templates(sdist: Path, destination: Path) -> None:
    """Every templates.yaml of the sdist, atomically (an interrupted run leaves no partial folder)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".templates-", dir=destination.parent))
    try:
        with tarfile.open(sdist) as tar:
            for member in tar:
                if not member.isfile() or _TEMPLATES_IN_TAR not in member.name:
                    continue
                relative = member.name.split(_TEMPLATES_IN_TAR, 1)[1]
                if not relative.endswith(TEMPLATE_FILE) or ".." in Path(relative).parts:
                    continue
                target = staging / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out)
        os.replace(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ensure_promptsource(cache_dir: Path) -> Path:
    """The folder of promptsource's template files under ``cache_dir``, downloading the sdist the first time.

    Raises:
        ServiceError: pip could not download the sdist.
    """
    root = cache_dir / "promptsource"
    templates = root / "templates"
    if not templates.is_dir():
        _extract_templates(_download_sdist(root / "downloads"), templates)
    return templates


def template_files(templates_dir: Path) -> dict[str, Path]:
    """``dataset`` or ``dataset/subset`` -> its templates.yaml, for every file under ``templates_dir``."""
    return {
        path.parent.relative_to(templates_dir).as_posix(): path
        for path in sorted(templates_dir.rglob(TEMPLATE_FILE))
    }
