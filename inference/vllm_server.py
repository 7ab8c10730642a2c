"""A vLLM OpenAI server as elmreg's child process: started from vLLM's own virtual environment on a loopback
port with the backbone folder elmreg already has, LoRA on, stopped when elmreg closes.

vLLM lives in its own environment (``.venv-vllm``, made by the Makefile) because its pins (transformers,
setuptools) differ from elmreg's; it only ever runs as a separate process, so nothing is imported from it here.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from elmreg.registry.errors import ConfigurationError, UserError, first_line
from elmreg.registry.settings import Settings, child_environ

# The Makefile makes vLLM's environment here, beside elmreg's own .venv.
_CHECKOUT = Path(__file__).resolve().parents[1]
DEFAULT_VLLM_VENV = _CHECKOUT / ".venv-vllm"
# The KV cache is sized for this many tokens at most: vLLM reserves memory for the whole context length, and
# gemma-3's 32k would take most of a small machine's RAM for prompts elmreg's limits never allow.
MAX_MODEL_LEN = 4096


@dataclass(frozen=True)
class VllmEndpoint:
    """Where a vLLM OpenAI server answers, and the name it serves the backbone under."""

    url: str
    model: str
    api_key: str = ""

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def connect(url: str, api_key: str = "") -> VllmEndpoint:
    """The endpoint of a running vLLM server, with the name it serves its base model under.

    Raises:
        ConfigurationError: Nothing answers at ``url``, or it lists no base model.
    """
    endpoint = VllmEndpoint(url, "", api_key)
    try:
        response = httpx.get(f"{url}/v1/models", headers=endpoint.headers, timeout=10)
    except httpx.TransportError as exc:
        raise ConfigurationError(f"no vLLM server answers at {url}: {first_line(exc)}") from None
    if response.status_code != 200:
        raise ConfigurationError(
            f"the vLLM server at {url} answered {response.status_code} to GET /v1/models"
        )
    # Adapters are listed with their base model as parent; the base model has none.
    bases = [m["id"] for m in response.json().get("data", []) if not m.get("parent")]
    if not bases:
        raise ConfigurationError(f"the vLLM server at {url} lists no base model")
    return VllmEndpoint(url, bases[0], api_key)


def vllm_python(settings: Settings) -> Path:
    """The Python of vLLM's environment.

    Raises:
        UserError: vLLM is not installed there.
    """
    python = Path(settings.vllm_python) if settings.vllm_python else DEFAULT_VLLM_VENV / "bin" / "python"
    if not python.is_file():
        raise UserError(
            f"vLLM is not installed ({python} does not exist): run 'make .venv-vllm', set ELMREG_VLLM_PYTHON, "
            "or give --vllm-url of a running vLLM server"
        )
    return python


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _max_model_len(folder: Path) -> int:
    config = json.loads((folder / "config.json").read_text())
    config = config.get("text_config", config)
    return min(int(config.get("max_position_embeddings", MAX_MODEL_LEN)), MAX_MODEL_LEN)


class VllmServer:
    """A vLLM OpenAI server process on a loopback port (see the module docstring)."""

    def __init__(self, settings: Settings, folder: Path, *, served_name: str, log_dir: Path):
        """Start vLLM on ``folder`` (a Hugging Face model folder) and wait until it is healthy.

        Raises:
            UserError: vLLM is not installed.
            ConfigurationError: It exited or did not become healthy within ``vllm_start_timeout``.
        """
        python = vllm_python(settings)
        port = _free_port()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"vllm-{port}.log"
        command = [
            str(python),
            "-m",
            # Not the `vllm` console script: the CPU build's fails to find a distribution named `vllm`.
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(folder),
            "--served-model-name",
            served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--enable-lora",
            "--max-loras",
            str(settings.vllm_max_loras),
            "--max-lora-rank",
            str(settings.vllm_max_lora_rank),
            # float32 like the built-in engine, so that both give the same greedy answers.
            "--dtype",
            "float32",
            "--max-model-len",
            str(_max_model_len(folder)),
            "--gpu-memory-utilization",
            str(settings.vllm_memory_utilization),
        ]
        env = child_environ(VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.endpoint = VllmEndpoint(f"http://127.0.0.1:{port}", served_name)
        try:
            self._wait_healthy(settings.vllm_start_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigurationError(
                    f"vLLM exited with status {self.process.returncode} while starting: {self._last_error()} "
                    f"(log: {self.log_path})"
                )
            try:
                if httpx.get(f"{self.endpoint.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise ConfigurationError(f"vLLM did not become healthy within {timeout:.0f} s (log: {self.log_path})")

    def _last_error(self) -> str:
        lines = [
            line.strip() for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()
        ]
        errors = [line for line in lines if "Error" in line]
        return (errors or lines or ["no output"])[-1][:300]

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 30 s)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
