"""Token-level divergence between a student's and a teacher's next-token distributions (distillation's loss).

The formula is TRL's GKDTrainer.generalized_jsd_loss (Agarwal et al. 2024, eq. 1), per token, with both distributions
softened by `temperature`:
    beta = 0:  KL(teacher || student)        (forward KL: the student covers every reply the teacher would give)
    beta = 1:  KL(student || teacher)        (reverse KL: the student's own replies are ones the teacher would give)
    else:      beta KL(teacher || m) + (1 - beta) KL(student || m),  m = beta teacher + (1 - beta) student
Logits exist only at reply positions and one chunk of them at a time (as in the SFT loss, loss.py): each chunk's
student and teacher logits are computed, compared and dropped under activation checkpointing, so the step's memory is
flat in the reply length, not (tokens x vocabulary) twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from .loss import backbone_and_head, chunk_rows, supervised_forward, upcast


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    temperature: float = 1.0) -> torch.Tensor:
    """The divergence at each position: (positions, vocab) logits -> (positions,)."""
    student = F.log_softmax(upcast(student_logits) / temperature, dim=-1)
    teacher = F.log_softmax(upcast(teacher_logits) / temperature, dim=-1)
    if beta == 0:
        divergence = F.kl_div(student, teacher, reduction="none", log_target=True)
    elif beta == 1:
        divergence = F.kl_div(teacher, student, reduction="none", log_target=True)
    else:
        weight = torch.tensor(beta, dtype=student.dtype, device=student.device)
        mixture = torch.logsumexp(torch.stack([student + torch.log1p(-weight), teacher + torch.log(weight)]), dim=0)
        divergence = (weight * F.kl_div(mixture, teacher, reduction="none", log_target=True)
                      + (1 - weight) * F.kl_div(mixture, student, reduction="none", log_target=True))
    return divergence.sum(-1)


class ReplyLogits:
    """A model's logits at a batch's reply positions, to be computed a chunk at a time: the final hidden states there
    and the output weight, or under ZeRO-3 (partitioned output weight) the logits themselves (loss.supervised_forward)."""

    def __init__(self, model, batch: dict, rows: torch.Tensor, cols: torch.Tensor):
        hidden, self.logits, self.aux_loss = supervised_forward(model, batch, rows, cols)
        self.hidden = hidden[rows, cols] if hidden is not None else None
        self.weight = backbone_and_head(model)[1].weight if hidden is not None else None

    @property
    def vocab_size(self) -> int:
        return self.logits.shape[-1] if self.logits is not None else self.weight.shape[0]

    def inputs(self, start: int, end: int) -> tuple:
        return (self.logits[start:end], None) if self.logits is not None else (self.hidden[start:end], self.weight)


def _chunk_logits(x: torch.Tensor, weight: torch.Tensor | None, vocab: int) -> torch.Tensor:
    return (x if weight is None else x @ weight.T)[:, :vocab]


def _chunk_divergence(s_x, s_w, t_x, t_w, vocab: int, beta: float, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        teacher = _chunk_logits(t_x, t_w, vocab)
    return generalized_jsd(_chunk_logits(s_x, s_w, vocab), teacher, beta, temperature)


def reply_divergences(student: ReplyLogits, teacher: ReplyLogits, beta: float, temperature: float = 1.0,
                      chunk_size: int | None = None) -> torch.Tensor:
    """The divergence at every reply position, differentiable in the student only. The two vocabularies are compared
    on their common first rows: a checkpoint's output layer may have a few padding rows more than the other's
    (Qwen2.5-0.5B 151,936, 7B 152,064), which no token of the shared tokenizer uses."""
    vocab = min(student.vocab_size, teacher.vocab_size)
    positions = student.logits if student.logits is not None else student.hidden
    n = positions.shape[0]
    chunk_size = chunk_size or max(16, chunk_rows(vocab) // 4)  # a chunk holds a few (rows, vocab) fp32 buffers
    pieces = [torch.utils.checkpoint.checkpoint(_chunk_divergence, *student.inputs(s, s + chunk_size),
                                                *teacher.inputs(s, s + chunk_size), vocab, beta, temperature,
                                                use_reentrant=False)
              for s in range(0, n, chunk_size)]
    return torch.cat(pieces) if pieces else positions.new_zeros(0)
