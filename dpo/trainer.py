"""The DPO training loop on ``accelerate``: AdamW, warmup + decay, clipping, accumulation, DDP.

One optimizer step consumes ``batch_size × grad_accum × processes`` examples. Their losses are
summed and divided by the step's global number of loss terms (pairs, or rankings for
Plackett–Luce), whatever the split over micro-batches and processes, so a 2-process run
matches a 1-process run with the same global batch. The step's examples are sorted by length
and cut into contiguous micro-batches to limit padding; which examples form step ``s`` is a
pure function of (seed, epoch, s), which is what makes ``--resume`` exact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm import tqdm

from dpo.batching import EncodedExample, PreferenceBatch, collate, length_grouped_batches
from dpo.losses import pairwise_loss, plackett_luce_loss
from dpo.reference import Reference, eval_mode
from dpo.train_config import TrainConfig, local_paths

STATS = ("loss", "units", "pairs", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
         "logps/chosen", "logps/rejected", "logps/accuracies", "logps/mean_accuracies", "tokens")  # fmt: skip
# logps/accuracies: share of pairs where log π(chosen) > log π(rejected), summed over response tokens
# (mean_: per response token) -- the reference-free reward of the current policy.


class PolicyScorer(torch.nn.Module):
    """The policy with dporm's log-prob path as its ``forward``, so DDP hooks see every call."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, seqs, adapter: bool = True) -> torch.Tensor:
        from dpo.logprobs import sequence_logprobs

        if adapter:
            return sequence_logprobs(self.model, seqs).logp
        with self.model.disable_adapter(), eval_mode(self.model):  # the reference: no dropout
            return sequence_logprobs(self.model, seqs).logp


def loss_units(example: EncodedExample, loss: str) -> int:
    """Loss terms an example contributes: one per ranking for Plackett–Luce, else one per pair."""
    return 1 if loss == "plackett_luce" else len(example.pairs)


def batch_loss(config: TrainConfig, batch: PreferenceBatch, logp: torch.Tensor, ref_logp: torch.Tensor,
               tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Summed loss of the batch and its summed statistics (see :data:`STATS`)."""
    ci, ri = batch.chosen_index.to(logp.device), batch.rejected_index.to(logp.device)
    if config.loss == "plackett_luce":
        width = max(len(r) for r in batch.rankings)
        index = torch.zeros(len(batch.rankings), width, dtype=torch.long)
        valid = torch.zeros(len(batch.rankings), width, dtype=torch.bool)
        for row, ranking in enumerate(batch.rankings):
            index[row, : len(ranking)] = torch.tensor(ranking)
            valid[row, : len(ranking)] = True
        losses = plackett_luce_loss((logp - ref_logp)[index.to(logp.device)], config.beta, valid.to(logp.device))
    else:
        losses = pairwise_loss(config.loss, logp[ci], logp[ri], ref_logp[ci], ref_logp[ri], config.beta,
                               config.label_smoothing, tokens[ci], tokens[ri]).losses  # fmt: skip
    with torch.no_grad():
        chosen, rejected = config.beta * (logp[ci] - ref_logp[ci]), config.beta * (logp[ri] - ref_logp[ri])
        stats = torch.stack([
            losses.detach().sum(), torch.tensor(float(losses.numel())), torch.tensor(float(ci.numel())),
            chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(), (chosen - rejected).sum(),
            logp[ci].sum(), logp[ri].sum(), (logp[ci] > logp[ri]).float().sum(),
            (logp[ci] / tokens[ci].clamp(min=1) > logp[ri] / tokens[ri].clamp(min=1)).float().sum(),
            tokens.sum().float(),
        ]).double().cpu()  # fmt: skip
    return losses.sum(), stats


def stats_to_metrics(stats: torch.Tensor) -> dict[str, float]:
    s = dict(zip(STATS, stats.tolist(), strict=True))
    pairs = max(s["pairs"], 1.0)
    out = {"loss": s["loss"] / max(s["units"], 1.0)}
    for name in STATS[3:11]:
        out[name] = s[name] / pairs
    out["pairs"], out["tokens"] = s["pairs"], s["tokens"]
    return out


def wilson_interval(successes: float, n: float, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


@dataclass
class Schedule:
    steps_per_epoch: int
    total_steps: int
    examples_per_step: int


def plan(config: TrainConfig, n_examples: int, processes: int) -> Schedule:
    per_step = config.batch_size * config.grad_accum * processes
    minimum = config.grad_accum * processes  # every process needs one example per micro-batch
    full, rest = divmod(n_examples, per_step)
    steps_per_epoch = full + (1 if rest >= minimum else 0)
    if steps_per_epoch == 0:
        from dpo.errors import DpormError

        raise DpormError(f"{n_examples} usable training example(s) cannot fill one step of {per_step}")
    total = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    return Schedule(steps_per_epoch, total, per_step)


class Trainer:
    def __init__(self, config: TrainConfig, accelerator, policy: torch.nn.Module, reference: Reference | None,
                 train: Sequence[EncodedExample], evaluation: Sequence[EncodedExample],
                 log: Callable[[int, dict, str], None], starts_at_reference: bool = False,
                 run_identity: dict | None = None):  # fmt: skip
        from transformers import get_scheduler

        self.run_identity = run_identity or {}  # saved in every checkpoint; --resume compares it
        self.config, self.accelerator = config, accelerator
        self.train_set, self.eval_set, self.reference, self.log = list(train), list(evaluation), reference, log
        self.lengths = [ex.tokens for ex in self.train_set]
        self.schedule = plan(config, len(self.train_set), accelerator.num_processes)
        params = [p for p in policy.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)
        name = {"constant": "constant_with_warmup"}.get(config.schedule, config.schedule)
        warmup = math.ceil(config.warmup_ratio * self.schedule.total_steps)
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup,
                                  num_training_steps=self.schedule.total_steps)  # fmt: skip
        self.policy, self.optimizer = accelerator.prepare(policy, optimizer)
        self.scheduler = scheduler  # stepped once per optimizer step by us, not by accelerate
        if reference is None:  # the policy with its adapter off, through the wrapped module (DDP/FSDP)
            self.reference = self._adapter_off
        self._epoch_cache: tuple[int, list[list[int]]] | None = None
        self.starts_at_reference = starts_at_reference  # step 0: policy == reference, rewards exactly 0

    # --- batches -----------------------------------------------------------------------------------

    def step_examples(self, step: int) -> list[int]:
        epoch, position = divmod(step, self.schedule.steps_per_epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            n, per = len(self.train_set), self.schedule.examples_per_step
            if self.config.shuffle:
                batches = length_grouped_batches(self.lengths, per, self.config.seed, epoch)
                batches.sort(key=len, reverse=True)  # the one short batch, if any, goes last
            else:
                batches = [list(range(i, min(i + per, n))) for i in range(0, n, per)]
            self._epoch_cache = (epoch, batches)
        return self._epoch_cache[1][position]

    def micro_batches(self, examples: list[int]) -> list[list[int]]:
        """This process's micro-batches: the step's examples by length, cut into contiguous chunks."""
        ordered = sorted(examples, key=lambda i: -self.lengths[i])
        chunks = self.config.grad_accum * self.accelerator.num_processes
        base, extra = divmod(len(ordered), chunks)
        bounds = [0]
        for c in range(chunks):
            bounds.append(bounds[-1] + base + (1 if c < extra else 0))
        rank = self.accelerator.process_index
        mine = range(rank, chunks, self.accelerator.num_processes)
        return [ordered[bounds[c] : bounds[c + 1]] for c in mine]

    # --- steps -------------------------------------------------------------------------------------

    def _adapter_off(self, seqs) -> torch.Tensor:
        with torch.no_grad():
            return self.policy(seqs, adapter=False)

    def _forward(self, examples: Sequence[EncodedExample], grad: bool, policy_is_reference: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        batch = collate(examples)
        device = self.accelerator.device
        tokens = torch.tensor([len(s.prompt_ids) + len(s.response_ids) for s in batch.seqs], device=device)
        response_tokens = torch.tensor([len(s.response_ids) for s in batch.seqs], device=device)
        with self.accelerator.autocast():
            ref_logp = self.reference(batch.seqs).to(device)
            if policy_is_reference:
                logp = ref_logp
            elif grad:
                logp = self.policy(batch.seqs)
            else:
                with torch.no_grad():
                    logp = self.policy(batch.seqs)
        loss, stats = batch_loss(self.config, batch, logp, ref_logp, response_tokens)
        stats[-1] = float(tokens.sum())
        return loss, stats

    def train_step(self, step: int) -> dict[str, float]:
        start = time.perf_counter()
        examples = self.step_examples(step)
        units = sum(loss_units(self.train_set[i], self.config.loss) for i in examples)
        scale = self.accelerator.num_processes / units  # DDP averages gradients over processes
        micro = self.micro_batches(examples)
        stats = torch.zeros(len(STATS), dtype=torch.float64)
        self.policy.train()
        for j, chunk in enumerate(micro):
            last = j == len(micro) - 1
            with nullcontext() if last else self.accelerator.no_sync(self.policy):
                loss, part = self._forward([self.train_set[i] for i in chunk], grad=True)
                self.accelerator.backward(loss * scale)
            stats += part
        max_norm = self.config.max_grad_norm or float("inf")
        grad_norm = self.accelerator.clip_grad_norm_(self.policy.parameters(), max_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        if not getattr(self.optimizer, "step_was_skipped", False):  # fp16's GradScaler skips steps with inf grads
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats = self.accelerator.reduce(stats.to(self.accelerator.device), "sum").cpu()
        seconds = time.perf_counter() - start
        metrics = stats_to_metrics(stats)
        metrics.update(grad_norm=float(grad_norm), lr=lr, step_seconds=seconds,
                       epoch=(step + 1) / self.schedule.steps_per_epoch)  # fmt: skip
        metrics["tokens/s"] = metrics["tokens"] / seconds
        return metrics

    def evaluate(self, at_start: bool = False) -> dict[str, float]:
        """Eval metrics over the whole eval set, sharded over processes; adds a 95% CI on accuracy.
        At step 0, when the policy starts as the reference, one reference pass gives everything."""
        order = sorted(range(len(self.eval_set)), key=lambda i: -self.eval_set[i].tokens)
        size = self.config.batch_size
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        world = self.accelerator.num_processes
        mine = batches[self.accelerator.process_index :: world]
        mine += [None] * (math.ceil(len(batches) / world) - len(mine))  # same forward count on every process
        stats = torch.zeros(len(STATS), dtype=torch.float64)
        start = time.perf_counter()
        self.policy.eval()
        for chunk in tqdm(mine, desc="eval", unit="batch", leave=False, disable=not self.accelerator.is_main_process):
            examples = [self.eval_set[i] for i in (chunk or batches[0])]
            part = self._forward(examples, grad=False, policy_is_reference=at_start and self.starts_at_reference)[1]
            if chunk is not None:
                stats += part
        stats = self.accelerator.reduce(stats.to(self.accelerator.device), "sum").cpu()
        metrics = stats_to_metrics(stats)
        low, high = wilson_interval(metrics["rewards/accuracies"] * metrics["pairs"], metrics["pairs"])
        metrics.update({"rewards/accuracies_ci95_low": low, "rewards/accuracies_ci95_high": high,
                        "eval_seconds": time.perf_counter() - start})  # fmt: skip
        return metrics

    def trainable(self) -> dict[str, torch.Tensor]:
        model = self.accelerator.unwrap_model(self.policy)
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    # --- the loop ----------------------------------------------------------------------------------

    def fit(self, output, start_step: int = 0) -> dict[str, dict[str, float]]:
        """Train from ``start_step`` to the end; returns the last train and eval metrics."""
        from dpo.checkpoints import checkpoint_root, save_checkpoint, save_rng

        c, acc, total = self.config, self.accelerator, self.schedule.total_steps
        final: dict[str, dict[str, float]] = {}
        if self.eval_set and start_step == 0:
            final["eval_initial"] = self.evaluate(at_start=True)
            self.log(0, final["eval_initial"], "eval")
        bar = tqdm(total=total, initial=start_step, desc="train", unit="step", disable=not acc.is_main_process)
        for step in range(start_step, total):
            metrics = self.train_step(step)
            done = step + 1
            final["train"] = metrics
            if done % c.log_every == 0 or done == total:
                self.log(done, metrics, "train")
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}",
                            tok_s=f"{metrics['tokens/s']:.0f}")  # fmt: skip
            bar.update()
            if self.eval_set and c.eval_every and done % c.eval_every == 0 and done < total:
                self.log(done, self.evaluate(), "eval")
            if c.save_every and done % c.save_every == 0:
                if acc.is_main_process:
                    state = {"config": c.to_dict(), "total_steps": total, "paths": local_paths(c), **self.run_identity}
                    save_checkpoint(output, done, self.trainable(), self.optimizer, self.scheduler, state,
                                    c.keep_checkpoints, acc.scaler)  # fmt: skip
                acc.wait_for_everyone()
                if not acc.is_main_process:
                    save_rng(checkpoint_root(output) / f"step-{done:06d}", acc.process_index)
                acc.wait_for_everyone()
        bar.close()
        if self.eval_set:
            final["eval"] = self.evaluate()
            self.log(total, final["eval"], "eval")
        return final
