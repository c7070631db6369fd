"""Train a LoRA DPO policy with TRL's DPOTrainer on pre-tokenized rows, in file order, logging per-step metrics.

Reference baseline for benchmarks against dporm's own trainer: the policy is built with ``dpo.lora.apply_lora``
(same init), batch k is rows [k*B, (k+1)*B) of ``--data`` (fields prompt_ids, chosen_ids, rejected_ids), and
TRL is made to run exactly those token ids: its dataset preparation (chat template, EOS appending, tokenizing) is
skipped, truncation and pad-to-multiple are off, and every batch it feeds the model is checked against the rows.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from typing import Any

import torch
import trl
from datasets import Dataset
from torch.utils.data import SequentialSampler
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer

from dpo.allocator import keep_freed_memory
from dpo.lora import apply_lora


def vmhwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def load_rows(path: str, n: int) -> list[dict[str, list[int]]]:
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                ex = json.loads(line)
                rows.append({k: [int(t) for t in ex[k]] for k in ("prompt_ids", "chosen_ids", "rejected_ids")})
            if len(rows) == n:
                break
    if len(rows) < n:
        raise SystemExit(f"{path} has {len(rows)} rows; need {n} (steps x batch size)")
    return rows


class PreTokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer that keeps the given token ids, iterates sequentially and checks every batch it runs."""

    def __init__(self, *args: Any, rows: list[dict[str, list[int]]], **kwargs: Any) -> None:
        self.rows = rows
        self.batch_tokens: list[int] = []
        self.policy_logps: torch.Tensor | None = None
        self.ref_logps: torch.Tensor | None = None
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset: Dataset, *args: Any, **kwargs: Any) -> Dataset:
        return dataset  # already has prompt_ids/chosen_ids/rejected_ids: no EOS, no chat template, no filtering

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> SequentialSampler:
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def compute_loss(self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:  # fmt: skip
        if model.training:
            self._check_batch(inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _check_batch(self, inputs: dict[str, torch.Tensor]) -> None:
        ids, attn, comp = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
        bsz = self.args.per_device_train_batch_size
        k = len(self.batch_tokens)
        batch = self.rows[k * bsz : (k + 1) * bsz]
        assert ids.shape[0] == 2 * len(batch), f"step {k + 1}: {ids.shape[0]} sequences for {len(batch)} rows"
        for i, seq in enumerate([(r, "chosen_ids") for r in batch] + [(r, "rejected_ids") for r in batch]):
            row, key = seq
            want = row["prompt_ids"] + row[key]
            n = int(attn[i].sum())
            assert attn[i, :n].all(), f"step {k + 1} seq {i}: padding is not on the right"
            assert ids[i, :n].tolist() == want, f"step {k + 1} seq {i}: TRL token ids differ from prompt+{key}"
            mask = [0] * len(row["prompt_ids"]) + [1] * len(row[key])
            assert comp[i, :n].tolist() == mask and not comp[i, n:].any(), f"step {k + 1} seq {i}: completion mask"
        self.batch_tokens.append(ids.numel())


class StepRecorder(TrainerCallback):
    """Times each optimizer step and collects TRL's logged loss/rewards."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.seconds: list[float] = []
        self.logs: list[dict[str, float]] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.seconds.append(time.perf_counter() - self.t0)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        if logs and "loss" in logs and "rewards/chosen" in logs:
            self.logs.append(dict(logs))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--output", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dump-logps", help="write step 1's per-sequence policy/reference log-probs here (JSON)")
    p.add_argument("--ref-adapter-off", action="store_true",
                   help="drop TRL's 'ref' adapter copy so the reference runs with adapters disabled")  # fmt: skip
    return p.parse_args()


def main() -> None:
    a = parse_args()
    keep_freed_memory()  # as the dporm command does (dpo.allocator); every side of the comparison gets it
    torch.set_num_threads(a.threads)
    rows = load_rows(a.data, a.steps * a.batch_size)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model = apply_lora(model, r=a.lora_r, alpha=a.lora_alpha, dropout=0.0, targets="all-linear", seed=a.seed)
    recorder = StepRecorder()
    with tempfile.TemporaryDirectory() as out_dir:
        config = DPOConfig(
            output_dir=out_dir, per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=1,
            max_steps=a.steps, learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=a.max_grad_norm,
            bf16=False, fp16=False, gradient_checkpointing=False, precompute_ref_log_probs=False, use_cpu=True,
            seed=a.seed, data_seed=a.seed, beta=a.beta, loss_type=["sigmoid"], label_smoothing=0.0,
            max_length=None, pad_to_multiple_of=None, logging_steps=1, logging_strategy="steps", report_to="none",
            save_strategy="no", eval_strategy="no", dataloader_drop_last=False, dataloader_num_workers=0,
            disable_tqdm=True,
        )  # fmt: skip
        trainer = PreTokenizedDPOTrainer(
            model=model, ref_model=None, args=config, train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer, callbacks=[recorder], rows=rows,
        )  # fmt: skip
        if a.ref_adapter_off and "ref" in trainer.model.peft_config:
            trainer.model.delete_adapter("ref")

        def capture(_module: Any, _args: Any, output: Any) -> None:  # step 1 only: [chosen..., rejected...] sums
            if len(trainer.batch_tokens) == 1:
                logps = output.log_probs.detach().sum(dim=1)
                if torch.is_grad_enabled() and trainer.policy_logps is None:
                    trainer.policy_logps = logps
                elif not torch.is_grad_enabled() and trainer.ref_logps is None:
                    trainer.ref_logps = logps

        trainer.model.register_forward_hook(capture)
        start = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - start

    assert len(recorder.logs) == a.steps == len(recorder.seconds) == len(trainer.batch_tokens)
    nonpad = [sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
                  for r in rows[k * a.batch_size : (k + 1) * a.batch_size]) for k in range(a.steps)]  # fmt: skip
    with open(a.output, "w") as f:
        for k, (log, sec) in enumerate(zip(recorder.logs, recorder.seconds, strict=True)):
            line = {"step": k + 1, "loss": log["loss"], "rewards_chosen": log["rewards/chosen"],
                    "rewards_rejected": log["rewards/rejected"], "step_seconds": sec, "nonpad_tokens": nonpad[k],
                    "batch_tokens": trainer.batch_tokens[k]}  # fmt: skip
            f.write(json.dumps(line) + "\n")
        later = recorder.seconds[1:]
        summary = {
            "summary": True, "steps": a.steps, "total_seconds": total,
            "mean_step_seconds_excluding_first": sum(later) / len(later) if later else math.nan,
            "nonpad_tokens_per_s": sum(nonpad[1:]) / sum(later) if later else math.nan,
            "padding_fraction": 1.0 - sum(nonpad) / sum(trainer.batch_tokens),
            "vmhwm_mib": vmhwm_mib(), "trl_version": trl.__version__, "torch_threads": torch.get_num_threads(),
        }  # fmt: skip
        f.write(json.dumps(summary) + "\n")
    if a.dump_logps:
        assert trainer.policy_logps is not None and trainer.ref_logps is not None
        pc, pr = trainer.policy_logps.chunk(2)
        rc, rr = trainer.ref_logps.chunk(2)
        dump = {"step": 1, "rows": list(range(a.batch_size)), "policy_chosen_logps": pc.tolist(),
                "policy_rejected_logps": pr.tolist(), "ref_chosen_logps": rc.tolist(),
                "ref_rejected_logps": rr.tolist()}  # fmt: skip
        with open(a.dump_logps, "w") as f:
            json.dump(dump, f, indent=1)


if __name__ == "__main__":
    main()
