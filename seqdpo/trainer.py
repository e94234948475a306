"""One preference stage: TRL's DPOTrainer with seqdpo's hot path, loss registry and explicit reference.

TRL keeps the Trainer machinery (optimiser, scheduler, checkpoints, resume, distributed training,
logging); seqdpo replaces three things:

- the reference: every training row carries `ref_chosen_logps` / `ref_rejected_logps`, computed
  before the stage by the runner (base model from the shared cache, or the previous stage's model).
  TRL 1.16 would otherwise make a continued adapter its own reference (a frozen "ref" copy), which
  silently turns `reference: base` into sDPO from stage 2 on;
- the log-probs: `seqdpo.logprobs.sequence_logps` in the batch layout `model.packing` (no padding
  waste, each pair's prompt computed once by default, no full-vocabulary logits);
- the loss: any entry of `seqdpo.losses.LOSSES`, or a weighted combination.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import DPOConfig, DPOTrainer

from seqdpo.config import LossConfig
from seqdpo.logprobs import PairCollator, sequence_logps
from seqdpo.losses import PairLogps, compute_loss
from seqdpo.packing import DEFAULT_PACKING
from seqdpo.job.progress import StageProgress
from seqdpo.stage_settings import StageSettings

log = logging.getLogger("seqdpo")
SEEN_FILE = "seqdpo_seen.json"  # in each checkpoint: what the stage trained on up to it


def make_dpo_config(settings: StageSettings, output_dir: str, *, seed: int, max_length: int,
                    max_steps: int | None = None) -> DPOConfig:
    """The Trainer's arguments for a stage; `max_steps` is the strategy's override of train.max_steps."""
    t = settings.train
    return DPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=settings.lr,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if max_steps is None else max_steps,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5 reads a value < 1 as a ratio of the stage's steps
        weight_decay=t.weight_decay,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,
        report_to="none",  # seqdpo.tracking logs per stage; HF's W&B callback assumes one run per process
        seed=seed,
        bf16=t.bf16,
        gradient_checkpointing=t.gradient_checkpointing,
        use_cpu=not torch.cuda.is_available(),
        beta=settings.beta,
        max_length=max_length,
        dataloader_num_workers=0,
        disable_dropout=t.disable_dropout,
    )


class SeqDPOTrainer(DPOTrainer):
    def __init__(
        self,
        *,
        model,
        args: DPOConfig,
        train_dataset,
        processing_class,
        loss: LossConfig,
        packing: str = DEFAULT_PACKING,
        callbacks=None,
        label: str = "training",
        penalty: Callable[[SeqDPOTrainer], Callable[[], torch.Tensor]] | None = None,
    ):
        self.loss_cfg = loss
        # Pairs and tokens (prompt + chosen + rejected, all processes) the optimizer steps were taken on;
        # None when resumed from a checkpoint that did not record them
        self.seen: dict | None = {"pairs": 0, "tokens": 0}
        super().__init__(
            model=model,
            ref_model=None,
            args=args,
            train_dataset=train_dataset,
            processing_class=processing_class,
            data_collator=PairCollator(
                pad_token_id=processing_class.pad_token_id, max_length=args.max_length, packing=packing
            ),
            callbacks=callbacks,
        )
        # One labelled bar per stage and compact metric lines in the job log (seqdpo.job.progress)
        self.remove_callback(ProgressCallback)
        self.remove_callback(PrinterCallback)
        self.add_callback(StageProgress(label))
        # Handed a PeftModel, TRL copies its adapter into a frozen "ref" adapter. Our reference comes
        # precomputed with the data, so the copy would only cost memory and land in checkpoints.
        peft_model = self.accelerator.unwrap_model(self.model)
        if "ref" in peft_model.peft_config:
            peft_model.delete_adapter("ref")
            peft_model.set_adapter("default")
        # A callable () -> scalar added to the training loss (strategy=anchor); None for every other strategy.
        # Built from the trainer itself: the EWC Fisher takes gradients of this trainer's loss at the start.
        self.penalty = None if penalty is None else penalty(self)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # Rows arrive tokenized by seqdpo.logprobs.tokenize_pairs (which mirrors TRL's tokenisation and
        # keeps pair_id); TRL's version would re-tokenize from text that is no longer there.
        return dataset

    def _set_signature_columns_if_needed(self):
        self._signature_columns = ["prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"]

    def pair_logps(self, model, inputs) -> PairLogps:
        out = sequence_logps(model, inputs)
        return PairLogps(
            policy_chosen=out["chosen_logps"],
            policy_rejected=out["rejected_logps"],
            ref_chosen=inputs["ref_chosen_logps"].to(out["chosen_logps"]),
            ref_rejected=inputs["ref_rejected_logps"].to(out["rejected_logps"]),
            chosen_len=out["chosen_len"],
            rejected_len=out["rejected_len"],
        )

    def batch_loss(self, features: list[dict]) -> torch.Tensor:
        """The stage's scalar loss, with grad, on tokenized rows carrying reference log-probs (for probes)."""
        inputs = self._prepare_inputs(self.data_collator(features))
        return compute_loss(self.pair_logps(self.model, inputs), self.loss_cfg, self.beta)

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint:
            path = Path(resume_from_checkpoint) / SEEN_FILE
            self.seen = json.loads(path.read_text()) if path.exists() else None
            if self.seen is None:
                log.warning("%s has no %s: the stage's pairs and tokens seen are not known", resume_from_checkpoint, SEEN_FILE)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _save_checkpoint(self, model, trial):
        # Before the Trainer's files: a checkpoint complete by seqdpo.job.resume's test also holds this one
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / SEEN_FILE).write_text(json.dumps(self.seen))
        super()._save_checkpoint(model, trial)

    def _count_seen(self, inputs) -> None:
        n = torch.tensor([inputs["num_pairs"], inputs["num_tokens"]], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            n = self.accelerator.reduce(n, reduction="sum")
        if self.seen is not None:
            self.seen = {"pairs": self.seen["pairs"] + int(n[0]), "tokens": self.seen["tokens"] + int(n[1])}

    def _compute_loss(self, model, inputs, return_outputs):
        if model.training:
            self._count_seen(inputs)
        logps = self.pair_logps(model, inputs)
        loss = compute_loss(logps, self.loss_cfg, self.beta)
        self._record_metrics("train" if model.training else "eval", logps)
        if self.penalty is not None and model.training:
            penalty = self.penalty()
            self._metrics["train"]["anchor/penalty"].append(penalty.item())  # the same on every rank
            loss = loss + penalty
        return (loss, None) if return_outputs else loss

    def _record_metrics(self, mode: str, lp: PairLogps) -> None:
        # Same names as TRL's, so dashboards built for TRL read seqdpo's stages.
        with torch.no_grad():
            chosen = self.beta * (lp.policy_chosen - lp.ref_chosen)
            rejected = self.beta * (lp.policy_rejected - lp.ref_rejected)
            gather = self.accelerator.gather_for_metrics
            m = self._metrics[mode]
            m["rewards/chosen"].append(gather(chosen).mean().item())
            m["rewards/rejected"].append(gather(rejected).mean().item())
            m["rewards/accuracies"].append(gather((chosen > rejected).float()).mean().item())
            m["rewards/margins"].append(gather(chosen - rejected).mean().item())
            m["logps/chosen"].append(gather(lp.policy_chosen.detach()).mean().item())
            m["logps/rejected"].append(gather(lp.policy_rejected.detach()).mean().item())
