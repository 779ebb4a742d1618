"""Importing faiss once, with a clear error when it is missing and a loud warning when two builds clash.

``faiss-cpu`` and ``faiss-gpu*`` (e.g. ``faiss-gpu-cu12``) install into the same ``faiss`` package, so
with both installed Python loads whichever build's files were written last, silently. The base install
of this project has no faiss: the ``[cpu]`` and ``[gpu]`` extras pick exactly one.
"""

from __future__ import annotations

import functools
import logging
from importlib import metadata
from types import ModuleType

logger = logging.getLogger(__name__)

CPU_DIST = "faiss-cpu"
GPU_DIST_PREFIX = "faiss-gpu"
MISSING_MESSAGE = (
    "faiss is not installed. Install exactly one build: "
    "`pip install 'internvl-retrieval[cpu]'` (faiss-cpu) or "
    "`pip install 'internvl-retrieval[gpu]'` (faiss-gpu-cu12, CUDA 12)"
)


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def installed_builds() -> tuple[list[str], list[str]]:
    """Installed faiss distributions as ``"name version"``: (faiss-cpu ones, faiss-gpu* ones)."""
    cpu: list[str] = []
    gpu: list[str] = []
    for dist in metadata.distributions():
        name = _normalise(dist.metadata.get("Name") or "")
        if name == CPU_DIST:
            cpu.append(f"{name} {dist.version}")
        elif name.startswith(GPU_DIST_PREFIX):
            gpu.append(f"{name} {dist.version}")
    return sorted(set(cpu)), sorted(set(gpu))


def loaded_build(faiss_module: ModuleType) -> tuple[str, int]:
    """Which build ``faiss_module`` is ("GPU" when it has ``StandardGpuResources``) and its GPU count."""
    try:
        ngpu = int(faiss_module.get_num_gpus())
    except (AttributeError, RuntimeError):
        ngpu = 0
    return ("GPU" if hasattr(faiss_module, "StandardGpuResources") else "CPU"), ngpu


def check_single_build(faiss_module: ModuleType) -> str | None:
    """Log a WARNING (and return it) when both faiss-cpu and a faiss-gpu* distribution are installed."""
    cpu, gpu = installed_builds()
    if not (cpu and gpu):
        return None
    build, ngpu = loaded_build(faiss_module)
    names = " ".join(s.split()[0] for s in cpu + gpu)
    wanted = "gpu" if build == "CPU" else "cpu"
    message = (
        f"CONFLICTING FAISS INSTALLS: {', '.join(cpu + gpu)} are all installed into the same `faiss` "
        f"package. Python loaded the {build} build (StandardGpuResources "
        f"{'present' if build == 'GPU' else 'absent'}, faiss.get_num_gpus() = {ngpu}). Keep exactly one: "
        f"they share files, so uninstall both and reinstall the one you want, e.g. "
        f"`pip uninstall -y {names} && pip install 'internvl-retrieval[{wanted}]'` "
        f"(or `[{'cpu' if wanted == 'gpu' else 'gpu'}]`)."
    )
    logger.warning(message)
    return message


@functools.cache
def import_faiss() -> ModuleType:
    """The ``faiss`` module, checked once per process (see the module docstring).

    Raises ``ImportError`` naming the ``[cpu]`` / ``[gpu]`` extras when faiss is not installed.
    """
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(MISSING_MESSAGE) from exc
    check_single_build(faiss)
    return faiss
