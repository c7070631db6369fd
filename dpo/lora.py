"""LoRA policies: one copy of the base weights serves as policy (adapter on) and reference (adapter off)."""

from __future__ import annotations

import warnings

import torch

from dpo.errors import DpormError


def apply_lora(model, r: int = 16, alpha: float = 32.0, dropout: float = 0.0, targets: str = "all-linear",
               seed: int = 0):  # fmt: skip
    """Wrap ``model`` in a PEFT LoRA adapter; the A matrices are drawn from ``torch.manual_seed(seed)``.

    ``targets`` is ``all-linear`` (every linear layer but the LM head) or a comma-separated list of
    module names. B starts at zero, so the wrapped model computes exactly the base model at step 0.
    """
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise DpormError(f"lora rank must be at least 1, got {r}")
    target_modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        bias="none", task_type="CAUSAL_LM")  # fmt: skip
    torch.manual_seed(seed)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise DpormError(f"cannot apply LoRA ({targets}): {str(e).splitlines()[0]}") from None


def load_adapter(base, path: str, allow_pickle: bool = False):
    """``base`` wrapped with the PEFT adapter saved at ``path``; a pickle adapter (.bin) only when ``allow_pickle``."""
    from pathlib import Path

    from peft import PeftModel

    folder = Path(path)
    if not (folder / "adapter_config.json").is_file():
        raise DpormError(f"{path}: not a PEFT adapter directory (no adapter_config.json)")
    if not (folder / "adapter_model.safetensors").is_file():
        if not allow_pickle:
            raise DpormError(f"{path}: no adapter_model.safetensors (pickle adapters load only with --allow-pickle)")
        if not (folder / "adapter_model.bin").is_file():
            raise DpormError(f"{path}: no adapter weights (adapter_model.safetensors)")
    try:
        with warnings.catch_warnings():
            # PEFT warns that merging a delta on tied embeddings is hard; dporm unties before merging.
            # ("Model with ..." from PEFT 0.18, "Model has ..." from 0.19.)
            warnings.filterwarnings("ignore", message="Model (has|with) `tie_word_embeddings=True`")
            return PeftModel.from_pretrained(base, path).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise DpormError(f"cannot load adapter from {path}: {str(e).splitlines()[0]}") from None


def untie_embeddings(model):
    """Give the LM head its own copy of a matrix it shares with the input embeddings (``tie_word_embeddings``).

    A PEFT adapter may carry a delta on each of the two modules (:mod:`dpo.delta` stores the one delta of a
    tied matrix on both); merged into one shared matrix, it would be added twice.
    """
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    # Under an injected adapter the modules are wrappers: the shared matrix is their base layers'.
    head, embeddings = getattr(head, "base_layer", head), getattr(embeddings, "base_layer", embeddings)
    if head is not None and embeddings is not None and head.weight is embeddings.weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        model.config.tie_word_embeddings = False
    return model


def load_merged_adapter(base, path: str, allow_pickle: bool = False):
    """``base`` with the adapter at ``path`` merged in: the model the unmerged adapter computes, as plain weights.

    Tied embeddings are untied first, so a delta on both the embeddings and the head lands once on each.
    """
    return load_adapter(untie_embeddings(base), path, allow_pickle).merge_and_unload().eval()


def is_adapter_dir(path: str) -> bool:
    """A local PEFT adapter directory (``adapter_config.json``, no ``config.json`` of a full model)."""
    from pathlib import Path

    folder = Path(path).expanduser()
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def is_peft_model(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
