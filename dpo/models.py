"""Loading causal LMs and tokenizers safely: safetensors only, no remote code unless asked."""

from __future__ import annotations

from pathlib import Path

import torch

from dpo.errors import DpormError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# bf16 matmul weights, everything else float32: see mix_precision.
MIXED = "bf16-mixed"
# A policy and its reference in one pass, bf16 matmuls with shared rounding: dpo.paired (scoring only).
PAIRED = "bf16-paired"
AUTOCAST_ATTRIBUTE = "dporm_autocast_dtype"


def resolve_dtype(name: str, paired: bool = True) -> torch.dtype:
    """The weights' dtype of ``--dtype name``; ``paired=False`` where one model runs (nothing to pair)."""
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", MIXED: "float32", PAIRED: "float32"}
    if name == PAIRED and not paired:
        raise DpormError(f"--dtype {PAIRED} scores a policy with its reference: use it with score, serve or eval")
    try:
        return DTYPES[aliases.get(name, name)]
    except KeyError:
        choices = f"fp32, bf16, bf16-mixed{', bf16-paired' if paired else ''}, fp16"
        raise DpormError(f"unknown dtype {name!r}; choose one of {choices}") from None


def mix_precision(model, dtype: torch.dtype = torch.bfloat16):
    """Decoder-layer linear weights in ``dtype``; embeddings, norms, LM head stay float32.

    Forwards then run under autocast (:mod:`dpo.logprobs`): the matmuls in ``dtype``, the residual
    stream, norms, LM head and log-softmax in float32. The DPO reward is a small difference of two
    large log-probs, and rounding the residual stream to bf16 at every layer is most of plain bf16's
    error; this keeps bf16's matmul speed and halves the decoder's weight memory.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise DpormError(f"{type(model).__name__}: {MIXED} needs decoder layers (model.get_decoder().layers)")
    for module in layers.modules():
        if isinstance(module, torch.nn.Linear):
            module.to(dtype)
    setattr(model, AUTOCAST_ATTRIBUTE, dtype)
    return model


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DpormError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DpormError("device 'cuda' asked for, but no CUDA device is available")
    return device


def _check_local(path: str) -> None:
    """A path that exists must be a model directory; one that looks like a path must exist."""
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise DpormError(f"{path}: not a model directory (no config.json)")
    elif path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise DpormError(f"{path}: no such model directory")


def has_tokenizer(path: str) -> bool:
    """A local directory with a saved tokenizer (a model's, or a PEFT adapter's own copy)."""
    return (Path(path).expanduser() / "tokenizer_config.json").is_file()


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if not has_tokenizer(path):  # an adapter directory holds a tokenizer and no config.json
        _check_local(path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        cause = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        cause = cause if len(cause) <= 400 else cause[:399] + "…"  # one line, whole sentences where they fit
        raise DpormError(f"cannot load tokenizer from {path}: {cause}") from None


def load_model(
    path: str,
    dtype: str = "float32",
    device: str | None = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    """A causal LM in eval mode. Pickle checkpoints are refused unless ``allow_pickle``."""
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype, paired=False)  # one model: nothing to pair
    _check_local(path)
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch_dtype,
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    except (OSError, ValueError) as e:
        hint = "" if allow_pickle else " (only safetensors weights are loaded unless pickle is allowed)"
        raise DpormError(f"cannot load model from {path}: {str(e).splitlines()[0]}{hint}") from None
    except RuntimeError as e:  # transformers raises on weights shaped unlike the config (ignore_mismatched_sizes)
        if "mismatched" not in str(e) and "size mismatch" not in str(e):
            raise
        raise DpormError(f"{path}: the weights do not match the model its config describes: some have other "
                         f"shapes ({str(e).strip().splitlines()[0][:200]})") from None  # fmt: skip
    _check_loading(path, loading)
    if dtype == MIXED:
        mix_precision(model)
    return model.to(resolve_device(device)).eval()


def _check_loading(path: str, loading: dict) -> None:
    """A one-line error when the checkpoint's weights do not fill the model its config describes.

    transformers only logs missing weights (left randomly initialised) and unexpected ones: a model
    scored that way gives meaningless rewards.
    """
    problems = []
    for kind in ("missing", "unexpected", "mismatched"):
        keys = sorted(str(k) for k in loading.get(f"{kind}_keys") or ())
        if keys:
            problems.append(f"{len(keys)} {kind} (e.g. {keys[0]})")
    if problems:
        raise DpormError(f"{path}: the weights do not match the model its config describes: {', '.join(problems)}")


# Config fields that fix the shapes and the computation of a decoder: a policy and its reference must agree.
# Not tie_word_embeddings: it says whether the head shares the embedding's storage, not what is computed, and
# a merged LoRA policy is untied (dpo.lora) beside its tied reference.
ARCHITECTURE_KEYS = ("model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
                     "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "hidden_act")  # fmt: skip


def check_same_architecture(policy_config, reference_config) -> None:
    """A one-line error unless the two configs describe the same architecture."""
    # getattr resolves a config's own names (GPT-2's n_layer for num_hidden_layers). A field one config
    # leaves out (older configs have no "architectures") is not a difference.
    a, b = ({k: getattr(c, k, None) for k in ARCHITECTURE_KEYS} for c in (policy_config, reference_config))
    differ = [f"{k} {a[k]!r} vs {b[k]!r}" for k in ARCHITECTURE_KEYS
              if a[k] is not None and b[k] is not None and a[k] != b[k]]  # fmt: skip
    if differ:
        raise DpormError(f"policy and reference architectures differ: {'; '.join(differ)}")


# Config fields that hold the number of positions a model attends over (GPT-2's names map onto the first).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def context_length(config) -> int | None:
    """The positions a model's ``config`` allows (``max_position_embeddings`` or its GPT-2 style names), or None."""
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def weights_hash(model) -> str:
    """sha256 over parameter and buffer names, dtypes, shapes and bytes: identifies a model's weights."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return digest.hexdigest()
