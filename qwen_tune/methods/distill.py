"""On-policy distillation (`qwen-tune distill`): a small Qwen (the student) learns to answer like a larger one (the
teacher) on its own replies (Agarwal et al. 2024, GKD; how Qwen3's small models were made).

Each training batch:
  1. with probability lmbda (default 1: always) the student samples a reply to each prompt; otherwise the batch takes
     the dataset's replies, or with --seq_kd the teacher's samples (off-policy; TRL's GKD convention);
  2. student and teacher read the (prompt, reply) sequences, packed (padded where a model's layers cannot keep packed
     sequences apart);
  3. the loss is the mean over reply tokens of the divergence between their next-token distributions (TRL's
     generalised JSD; default beta = 1, the reverse KL(student || teacher): the student is pulled towards the teacher's
     preferred continuation of what it actually writes), the teacher's logits computed only at reply positions, a chunk
     at a time (train/divergence.py).
The student trains full, LoRA or Q-LoRA with every run's safety (checkpoints, resume, NaN stop, SIGTERM); the teacher is
frozen, sharded like the student under ZeRO-3, and must share the student's tokenizer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import partial

import torch
from transformers import GenerationConfig, Trainer

from ..data.collate import PromptCollator
from ..data.distill_prompts import encode_distill_prompts
from ..errors import UserError
from ..models.model import is_adapter, load_model, resolve_model_path
from ..models.tokenizer import load_tokenizer
from ..options import LearningRates, Method, TrainingArguments, load
from ..options.groups import Frozen
from ..train.distributed import print_zero3_partition
from ..train.divergence import ReplyLogits, reply_divergences
from ..train.guards import ObservedSteps
from ..train.loss import LossOnlyEvaluation, router_aux_loss_coef, supervised_positions
from ..train.pair_trainer import (POLICY_OPTION_GROUPS, MetricsSinceLastLog, load_pairs, load_policy, train_and_finish,
                                  trainer_inputs)


@dataclass
class DistillInputs(Frozen):
    _argument_group_name = "distill"
    teacher: str | None = field(default=None, metadata={"help": "The teacher: a model directory or hub id with the student's tokenizer (e.g. a larger Qwen of the same generation)."})


@dataclass
class DistillTrainingArguments(TrainingArguments):
    """Our training options (the seed's flags and defaults) plus distillation's (TRL's GKDConfig names)."""

    output_dir: str = field(default="output_qwen_distill", metadata={"help": "Where checkpoints and the trained student go."})
    beta: float = field(default=1.0, metadata={"help": "The divergence (TRL GKD's beta): 1 reverse KL(student || teacher), 0 forward KL(teacher || student), "
                                                       "between them the generalised Jensen-Shannon divergence."})
    lmbda: float = field(default=1.0, metadata={"help": "Share of batches on the student's own sampled replies (TRL GKD's lmbda): 1 on-policy, "
                                                        "0 off-policy on the dataset's replies (every sample then needs one) or the teacher's "
                                                        "(--seq_kd), between: drawn per batch."})
    seq_kd: bool = field(default=False, metadata={"help": "Off-policy batches on replies the teacher samples instead of the dataset's (TRL GKD's "
                                                          "sequence-level KD; Qwen3's off-policy distillation stage)."})
    temperature: float = field(default=1.0, metadata={"help": "Temperature of the sampled replies and of both distributions in the loss (1: the "
                                                              "models' own distributions)."})
    max_new_tokens: int = field(default=128, metadata={"help": "Longest sampled reply in tokens (TRL GKD's 128)."})
    include_num_input_tokens_seen: str = field(default="no", metadata={"help": "Distillation's replies are sampled during the step, not read from data."})


def check_options(values: dict[str, dict]) -> None:
    train, teacher = values["train"], values["distill"]["teacher"]
    if not teacher:
        raise UserError("--teacher is required: the model the student learns to answer like (see qwen-tune distill --help)")
    for name in ("beta", "lmbda"):
        if not 0 <= train[name] <= 1:
            raise UserError(f"--{name} {train[name]}: must be between 0 and 1")
    if train["temperature"] <= 0:
        raise UserError(f"--temperature {train['temperature']}: must be > 0")
    if train["max_new_tokens"] < 1:
        raise UserError(f"--max_new_tokens {train['max_new_tokens']}: must be >= 1")


METHOD = Method(
    "distill",
    groups={**POLICY_OPTION_GROUPS, "distill": DistillInputs, "train": DistillTrainingArguments},
    learning_rates=LearningRates(full=2e-5, lora=2e-4),  # TRL's GKDConfig (SFTConfig's 2e-5); ten times that for an adapter
    resolve=check_options,
)


def load_teacher(run, inputs: DistillInputs, trust_remote_code: bool):
    """The frozen teacher, once its tokenizer is shown to be the student's (the divergence compares token ids)."""
    if is_adapter(inputs.teacher):
        raise UserError(f"--teacher {inputs.teacher} is a LoRA adapter; merge it first (qwen-tune merge)")
    path = resolve_model_path(inputs.teacher)
    if load_tokenizer(path, trust_remote_code=trust_remote_code).get_vocab() != run.tokenizer.get_vocab():
        raise UserError(f"--teacher {inputs.teacher}: its tokenizer is not the student's ({run.model_path}); distillation "
                        "compares the two models' next-token distributions token for token, so both need the same tokenizer")
    teacher = load_model(path, **run.load_options, log=lambda _: None).eval().requires_grad_(False)
    print_zero3_partition(teacher, "teacher")
    return teacher


class DistillTrainer(MetricsSinceLastLog, ObservedSteps, LossOnlyEvaluation, Trainer):
    """HF Trainer whose batches are prompts: the student answers them in the step and the loss is the divergence to the
    teacher on those replies. Logs on_policy (the share of batches on the student's replies) and, of sampled replies
    (the student's, or the teacher's with --seq_kd), completions/mean_length and completions/clipped_ratio (TRL's
    names: replies that hit --max_new_tokens)."""

    def __init__(self, *args, teacher, end_ids: list[int], **kwargs):
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled:  # ZeRO-3: the frozen teacher is sharded like the student
            from trl.models import prepare_deepspeed

            self.teacher = prepare_deepspeed(teacher, self.accelerator)
        else:
            self.teacher = teacher.to(self.args.device)
        self.aux_loss_coef = router_aux_loss_coef(self.model)
        self.drawn_at, self.micro_batch = None, 0  # draw_on_policy's place in the run
        self.sampling = GenerationConfig(do_sample=True, temperature=self.args.temperature, top_k=0, top_p=1.0,
                                         max_new_tokens=self.args.max_new_tokens, eos_token_id=end_ids,
                                         pad_token_id=self.data_collator.pad_token_id)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        on_policy = self.draw_on_policy() if model.training else self.args.lmbda > 0
        sampled = on_policy or self.args.seq_kd
        if sampled:
            writer = model if on_policy else self.teacher
            sides = list(zip(inputs["prompt_ids"], self.sample_replies(writer, inputs["prompt_ids"])))
        else:
            sides = list(zip(inputs["reply_prompt_ids"], inputs["reply_ids"]))
        batch = self._prepare_inputs(self.data_collator.rows(sides))
        (rows, cols), _ = supervised_positions(batch["labels"])
        student = ReplyLogits(model, batch, rows, cols)
        with torch.no_grad():
            teacher = ReplyLogits(self.teacher, batch, rows, cols)
        loss = reply_divergences(student, teacher, self.args.beta, self.args.temperature).mean()
        metrics = {"on_policy": torch.tensor(float(on_policy))}
        if sampled:
            lengths = torch.tensor([float(len(reply)) for _, reply in sides])
            metrics |= {"completions/mean_length": lengths,
                        "completions/clipped_ratio": (lengths >= self.args.max_new_tokens).float()}
        if model.training and self.aux_loss_coef is not None and student.aux_loss is not None:
            loss = loss + self.aux_loss_coef * student.aux_loss.to(loss.dtype)
            metrics["aux_loss"] = student.aux_loss
        self.record_metrics(metrics, model.training)
        return (loss, None) if return_outputs else loss

    def draw_on_policy(self) -> bool:
        """TRL's draw, on-policy with probability lmbda, made from the seed, the step and the micro-batch: the same on
        every rank (under ZeRO-3 every rank must sample, gathering the weights, together) and again after a resume."""
        step = self.state.global_step
        self.micro_batch = self.micro_batch + 1 if self.drawn_at == step else 0
        self.drawn_at = step
        return random.Random(f"{self.args.seed}:{step}:{self.micro_batch}").random() < self.args.lmbda

    def sample_replies(self, model, prompts: list[list[int]]) -> list[list[int]]:
        """`model`'s (the student's or the teacher's) reply to each prompt, through its first end token (`<|im_end|>`),
        sampled with its weights gathered under ZeRO-3 (TRL's unwrap_model_for_generation) and the KV cache on."""
        from trl.models import unwrap_model_for_generation

        width, pad = max(len(p) for p in prompts), self.sampling.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.args.device)  # left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.args.device)
        with unwrap_model_for_generation(model, self.accelerator,
                                         gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs) as writer:
            was_training = writer.training
            writer.eval()
            try:
                out = writer.generate(input_ids=ids, attention_mask=mask, generation_config=self.sampling, use_cache=True)
            finally:
                writer.train(was_training)
        replies = []
        for row in out[:, width:].tolist():
            end = next((i for i, token in enumerate(row) if token in self.sampling.eos_token_id), None)
            replies.append(row if end is None else row[: end + 1])
        return replies


def run(config, callbacks: tuple = ()) -> dict:
    """`callbacks`: extra Trainer callbacks (tests use them to trace batches and inject faults)."""
    args = config.train
    reply_needed = None if args["lmbda"] == 1 or args["seq_kd"] else "off-policy batches (--lmbda below 1) train on the dataset's replies"
    prompts = load_pairs(config, partial(encode_distill_prompts, max_new_tokens=args["max_new_tokens"], reply_needed=reply_needed))
    teacher = load_teacher(prompts, config.distill, config.model.trust_remote_code)
    student = load_policy(prompts, config.lora, config.vision)
    end_ids = [prompts.tokenizer.convert_tokens_to_ids("<|im_end|>"), prompts.tokenizer.eos_token_id]
    trainer = DistillTrainer(teacher=teacher, end_ids=sorted({i for i in end_ids if i is not None}),
                             **trainer_inputs(prompts, student, callbacks, collator=PromptCollator))
    return train_and_finish(trainer, prompts, config, kind="distill")


def main(argv: list[str] | None = None, callbacks: tuple = ()) -> dict:
    return run(load(METHOD, argv), callbacks=callbacks)
