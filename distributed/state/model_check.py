"""What a model folder must hold before any engine starts: config.json naming a causal LM, weights
whose files are whole, a tokenizer. Problems are ModelPrepError naming the file and the fix."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_ALIAS = "smollm2-135m-instruct"


class ModelPrepError(RuntimeError):
    """The model could not be located, installed, converted or validated; the message says what to do."""


_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def validate_model_dir(folder: Path) -> None:
    """Raise ModelPrepError naming what a model folder lacks (config.json, weights); warn on no tokenizer."""
    folder = Path(folder)
    problems = []
    if not (folder / "config.json").is_file():
        problems.append("config.json")
    if not any(any(folder.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        problems.append("weights (*.safetensors or pytorch_model*.bin)")
    if problems:
        present = sorted(p.name for p in folder.iterdir())[:20]
        raise ModelPrepError(
            f"{folder} is not a Hugging Face model folder: it lacks {' and '.join(problems)}. "
            f"It holds: {present or 'nothing'}. Use save_pretrained output, or the alias {DEFAULT_MODEL_ALIAS!r}."
        )
    _check_causal_lm(folder)
    for weights in sorted(folder.glob("*.safetensors")):
        _check_safetensors(weights)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        log.warning("%s has no tokenizer files (%s); pass a tokenizer separately", folder, ", ".join(_TOKENIZER_FILES))


def _check_causal_lm(folder: Path) -> None:
    """A config.json that is unreadable, or names a model that does not generate text, fails here,
    before any engine starts, instead of deep inside vLLM or DeepSpeed."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelPrepError(f"{folder / 'config.json'} is not readable JSON ({exc}); the folder is damaged: "
                             "save the model again with save_pretrained") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelPrepError(f"{folder / 'config.json'} has no model_type: it is not a Hugging Face model config")
    architectures = config.get("architectures") or []
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise ModelPrepError(
            f"{folder} holds a {', '.join(architectures)}, which does not generate text; innerloop trains "
            "causal language models (architectures ending in ForCausalLM), e.g. the default "
            f"{DEFAULT_MODEL_ALIAS!r}")


def _check_safetensors(path: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header giving each tensor's byte range,
    then the data: a file shorter or longer than its header says is damaged (a torn copy, a full disk).
    Only the header is read."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError(f"its header claims {header_len} bytes, but the file has {size}")
            header = json.loads(f.read(header_len).decode("utf-8"))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ModelPrepError(f"{path} is damaged: not a readable safetensors file ({exc}); copy or save the "
                             "model again") from None
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        raise ModelPrepError(f"{path} is damaged: {size} bytes where its header describes {expected} "
                             "(truncated or torn); copy or save the model again")
