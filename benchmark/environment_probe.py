"""The environment check of `python -m benchmark.acceptance`: what this machine has (torch and its CUDA,
the driver, DALI's wheel and its mixed decode, nvJPEG's hardware decoder, ffcv, every loader), gathered
in a subprocess (`probe_environment`), and which of those facts fail an acceptance (`judge_environment`)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

NVJPEG_BACKEND_HARDWARE = 3
# NVJPEG_STATUS_ARCH_MISMATCH / _IMPLEMENTATION_NOT_SUPPORTED: the GPU has no JPEG engine nvJPEG can use.
NVJPEG_NO_HARDWARE = (7, 9)


def _cuda_major(version: str | None) -> int | None:
    return int(version.split(".")[0]) if version else None


def dali_wheels() -> dict[str, int | None]:
    """Installed DALI distributions -> the CUDA major their name is built for (nvidia-dali-cuda130 -> 13)."""
    from importlib import metadata

    found = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-dali"):
            match = re.search(r"cuda(\d+)", name)
            found[name] = int(match.group(1)) // 10 if match else None
    return found


def _dali_facts(torch_cuda: str | None) -> dict:
    wheels = dali_wheels()
    facts: dict = {"wheels": wheels, "torch_cuda_major": _cuda_major(torch_cuda)}
    try:
        import nvidia.dali

        facts["version"] = nvidia.dali.__version__
    except Exception as err:  # a broken DALI install must not stop the other facts
        facts["import_error"] = f"{type(err).__name__}: {err}"
    majors = {m for m in wheels.values() if m is not None}
    facts["matches_torch"] = None if not torch_cuda or not majors else majors == {_cuda_major(torch_cuda)}
    return facts


def find_libnvjpeg(cuda_major: int | None) -> str | None:
    """The libnvjpeg DALI loads: the nvidia-* wheel's copy for torch's CUDA major, else the system one."""
    import ctypes.util

    candidates = []
    with contextlib.suppress(ImportError):
        import nvidia

        for base in nvidia.__path__:  # nvidia/cu13/lib (CUDA 13 wheels), nvidia/nvjpeg/lib (CUDA 12)
            candidates += [p for p in Path(base).glob("*/lib/libnvjpeg.so.*")
                           if re.fullmatch(r"libnvjpeg\.so\.\d+", p.name)]
    candidates.sort(key=lambda p: p.name != f"libnvjpeg.so.{cuda_major}")
    if candidates:
        return str(candidates[0])
    return ctypes.util.find_library("nvjpeg")


def _nvjpeg_hardware(cuda_major: int | None) -> dict:
    """Ask nvJPEG itself for its hardware backend: nvjpegCreateEx(NVJPEG_BACKEND_HARDWARE) succeeds exactly
    where a JPEG engine exists (A100, H100, ...), which is the test DALI makes before using hw_decoder_load.
    More honest than a list of GPU names, which goes stale."""
    import ctypes

    lib = find_libnvjpeg(cuda_major)
    if lib is None:
        return {"present": None, "detail": "libnvjpeg not found"}
    nvjpeg = ctypes.CDLL(lib)
    nvjpeg.nvjpegCreateEx.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint,
                                      ctypes.POINTER(ctypes.c_void_p)]
    handle = ctypes.c_void_p()
    status = nvjpeg.nvjpegCreateEx(NVJPEG_BACKEND_HARDWARE, None, None, 0, ctypes.byref(handle))
    if status == 0:
        nvjpeg.nvjpegDestroy(handle)
        return {"present": True, "library": lib}
    present = False if status in NVJPEG_NO_HARDWARE else None
    return {"present": present, "library": lib, "detail": f"nvjpegCreateEx(HARDWARE) returned status {status}"}


def _dali_mixed_decode() -> dict:
    """Decode two JPEGs with the production settings (device="mixed", the loader's hw_decoder_load)."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def
    from PIL import Image

    from pipelines.dali_loader import HW_DECODER_LOAD

    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(2):
            path = Path(tmp) / f"{i}.jpg"
            pixels = np.random.default_rng(i).integers(0, 255, (96, 128, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
            files.append(str(path))

        @pipeline_def(batch_size=2, num_threads=1, device_id=0)
        def decode():
            jpegs, _ = fn.readers.file(files=files)
            return fn.decoders.image(jpegs, device="mixed", hw_decoder_load=HW_DECODER_LOAD)

        pipe = decode()
        pipe.build()
        (images,) = pipe.run()
        shapes = [list(images.as_cpu().at(i).shape) for i in range(2)]
    return {"ok": shapes == [[96, 128, 3]] * 2, "shapes": shapes, "hw_decoder_load": HW_DECODER_LOAD}


def _driver_facts() -> dict:
    """The driver's version (nvidia-smi) and the newest CUDA it supports (libcuda's cuDriverGetVersion)."""
    import ctypes

    facts: dict = {}
    if shutil.which("nvidia-smi"):
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        facts["nvidia_smi"] = proc.stdout.strip().splitlines() if proc.returncode == 0 else proc.stderr.strip()
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            facts["cuda_driver_api"] = f"{version.value // 1000}.{version.value % 1000 // 10}"
    except OSError:
        facts["cuda_driver_api"] = None  # no NVIDIA driver on this machine
    return facts


def _torch_facts() -> dict:
    import torch

    facts = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if facts["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        facts.update(device_count=torch.cuda.device_count(), device_name=props.name,
                     capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                     bf16=torch.cuda.is_bf16_supported())
    return facts


def _guarded(gather: Callable[[], dict]) -> dict:
    try:
        return gather()
    except Exception as err:  # one fact that cannot be read is reported, the others still are
        return {"error": f"{type(err).__name__}: {err}"}


def importable(package: str) -> dict:
    """Whether `package` imports, and its version: the import decides, and a package copied in without its
    distribution metadata (as onto the GPU machine) is importable with version "unknown" and a note."""
    from importlib import import_module, metadata

    try:
        module = import_module(package)
    except Exception as err:
        return {"importable": False, "error": f"{type(err).__name__}: {err}"}
    try:
        return {"importable": True, "version": metadata.version(package)}
    except metadata.PackageNotFoundError:
        version = getattr(module, "__version__", None)
        return {"importable": True, "version": version or "unknown",
                "note": f"{package} imports but has no distribution metadata (copied in, not pip-installed)"}


def probe_environment(out: str) -> None:
    """Runs in the environment check's subprocess: every fact, as JSON, to `out`."""
    import torch

    from benchmark.timing import environment
    from pipelines.registry import LOADER_MODULES, is_available

    torch_facts = _torch_facts()
    device = torch.device("cuda" if torch_facts["cuda_available"] else "cpu")
    facts = environment(device)
    facts["torch"] = torch_facts
    facts["driver"] = _guarded(_driver_facts)
    facts["dali"] = _guarded(lambda: _dali_facts(torch.version.cuda))
    facts["loaders"] = {name: is_available(name) for name in LOADER_MODULES}
    facts["ffcv"] = importable("ffcv")
    if device.type == "cuda":
        facts["nvjpeg_hw_decoder"] = _guarded(lambda: _nvjpeg_hardware(_cuda_major(torch.version.cuda)))
        facts["dali_mixed_decode"] = _guarded(_dali_mixed_decode)
    else:
        facts["nvjpeg_hw_decoder"] = {"present": None, "detail": "no CUDA device"}
    Path(out).write_text(json.dumps(facts, indent=1, default=str))


def judge_environment(facts: dict, quick: bool) -> tuple[list[str], list[str]]:
    """(problems, notes): a problem fails the check, a note is worth knowing but does not."""
    problems, notes = [], []
    torch_facts, dali, driver = facts["torch"], facts["dali"], facts["driver"]
    if not torch_facts["cuda_available"]:
        (notes if quick else problems).append("no CUDA device visible to torch")
    if torch_facts["cuda"] is None:
        notes.append("torch is a CPU build")
    driver_cuda = driver.get("cuda_driver_api")
    if torch_facts["cuda"] and driver_cuda and _cuda_major(driver_cuda) < _cuda_major(torch_facts["cuda"]):
        problems.append(f"the driver supports CUDA {driver_cuda}, torch needs CUDA {torch_facts['cuda']}")
    wheels = dali.get("wheels", {})
    if not wheels:
        problems.append("no nvidia-dali wheel installed (scripts/setup.sh installs the one for torch's CUDA)")
    elif len(wheels) > 1:
        problems.append(f"several DALI wheels installed ({', '.join(wheels)}); keep the one for torch's CUDA")
    if dali.get("matches_torch") is False:
        problems.append(f"DALI wheel {', '.join(wheels)} does not match torch's CUDA {torch_facts['cuda']}")
    for key in ("import_error", "error"):
        if key in dali:
            problems.append(f"DALI: {dali[key]}")
    if not facts["ffcv"]["importable"]:
        problems.append(f"ffcv is not importable: {facts['ffcv']['error']}")
    elif "note" in facts["ffcv"]:
        notes.append(facts["ffcv"]["note"])
    problems += [f"loader {name} is not importable" for name, ok in facts["loaders"].items() if not ok]
    decode = facts.get("dali_mixed_decode")
    if decode is not None and not decode.get("ok"):
        problems.append(f"DALI mixed (nvJPEG) decode failed: {decode.get('error', decode)}")
    hw = facts["nvjpeg_hw_decoder"]
    if torch_facts["cuda_available"] and hw.get("present") is False:
        notes.append("no nvJPEG hardware decoder on this GPU: DALI decodes with CUDA nvJPEG only")
    elif torch_facts["cuda_available"] and hw.get("present") is None:
        notes.append(f"nvJPEG hardware decoder unknown: {hw.get('detail') or hw.get('error')}")
    return problems, notes


def environment_headline(facts: dict) -> str:
    torch_facts, dali = facts["torch"], facts["dali"]
    hw = {True: "yes", False: "no", None: "n/a"}[facts["nvjpeg_hw_decoder"].get("present")]
    wheels = ", ".join(dali.get("wheels", {})) or "no wheel"
    return (f"torch {torch_facts['version']} (CUDA {torch_facts['cuda']}), DALI {dali.get('version', '-')} "
            f"({wheels}), ffcv {facts['ffcv'].get('version', '-')}, nvJPEG HW {hw}")

