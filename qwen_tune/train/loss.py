"""Memory-lean cross-entropy for the 151,936-word vocabulary.

Plain causal-LM loss materialises fp32 logits for every position (4,096 x 151,936 floats is 2.5 GB),
although only the assistant tokens are supervised. Here logits exist only at supervised positions,
one chunk at a time: the forward pass computes the loss and, in the same sweep, the gradients with
respect to the hidden states and the output weight, so no logits are kept for backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.utils.checkpoint

from ..data.chat_format import IGNORE
from ..models.linear_attention import BOUNDARY_KEYS
from ..models.model import is_vision_language


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Softmax precision: bf16 / fp16 logits in fp32; fp32 stays fp32 and fp64 stays fp64 (exactness tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), gradients precomputed chunk by chunk (one backward per forward,
    as in a training step). `with_grads` False (no_grad: evaluation, scoring): the sum alone, with no (vocab, dim)
    gradient buffer and no second matmul per chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, with_grads=True):
        needs_w = with_grads and weight.requires_grad
        ctx.weight_dtype = weight.dtype
        grad_hidden = torch.empty_like(hidden) if with_grads else None
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=acc) if needs_w else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            t = targets[start : start + chunk_size]
            # One (chunk, vocab) fp32 (fp64 for fp64) buffer holds the logits, then the probabilities, then d(sum CE)/d logits.
            logits = upcast(h @ weight.T)
            picked = logits.gather(1, t[:, None]).squeeze(1)
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()
            norm = probs.sum(dim=-1, keepdim=True)
            total += ((top + norm.log()).squeeze(1) - picked).sum()
            if not with_grads:
                continue
            grad = probs.div_(norm)  # softmax - onehot:
            grad[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            grad_hidden[start : start + chunk_size] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
            if needs_w:
                grad_weight.addmm_(grad.T, h.to(acc))  # in place: no second (vocab, dim) buffer per chunk
        # Kept on ctx, not saved for backward: backward scales them in place and hands them over (a step's single
        # backward), so no second (vocab, dim) copy exists next to the weight's .grad.
        ctx.grads = grad_hidden, grad_weight
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        gw = grad_weight.mul_(grad_out).to(ctx.weight_dtype) if grad_weight is not None else None
        return grad_hidden.mul_(grad_out.to(grad_hidden.dtype)), gw, None, None, None


LOGITS_CHUNK_BYTES = 256 * 2**20


def chunk_rows(vocab_size: int) -> int:
    """Rows per chunk so that one chunk's fp32 logits take about LOGITS_CHUNK_BYTES (441 rows for Qwen's 151,936
    words): the loss step's memory stays flat in the sequence length, and each chunk is still a large GEMM."""
    return max(32, LOGITS_CHUNK_BYTES // (4 * vocab_size))


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every position whose *next* token is supervised, and those next tokens."""
    shifted = labels[:, 1:]
    rows, cols = (shifted != IGNORE).nonzero(as_tuple=True)
    return (rows, cols), shifted[rows, cols]


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              chunk_size: int | None = None) -> tuple[torch.Tensor, int]:
    """Sum of token cross-entropies over supervised tokens and their count.

    `hidden` is the final hidden state (batch, seq, dim), `weight` the output projection (vocab, dim),
    `labels` the unshifted labels (-100 = not supervised). Dividing by the count of the whole
    optimizer step (not of each micro-batch) makes gradient accumulation exact.
    """
    (rows, cols), targets = supervised_positions(labels)
    n = int(targets.numel())
    if n == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0, 0
    selected = hidden[rows, cols]
    with_grads = torch.is_grad_enabled() and (selected.requires_grad or weight.requires_grad)
    return ChunkedLinearCrossEntropy.apply(selected, weight, targets, chunk_size or chunk_rows(weight.shape[0]), with_grads), n


def plain_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Reference loss from full logits (what the seed and TRL compute): sum over supervised tokens."""
    shifted_logits = upcast(logits[:, :-1])
    shifted_labels = labels[:, 1:]
    n = int((shifted_labels != IGNORE).sum())
    loss = torch.nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1),
        ignore_index=IGNORE, reduction="sum",
    )
    return loss, n


def unwrapped(model):
    """The transformers model under any PEFT / DeepSpeed / DDP wrapping."""
    inner = model
    while hasattr(inner, "module"):  # DeepSpeedEngine, DistributedDataParallel
        inner = inner.module
    if hasattr(inner, "get_base_model"):  # PEFT
        inner = inner.get_base_model()
    return inner


def backbone_and_head(model):
    """The decoder (hidden states) and output projection under any PEFT / DeepSpeed / DDP wrapping."""
    inner = unwrapped(model)
    return inner.get_decoder(), inner.get_output_embeddings()


def sequence_logprobs(model, batch: dict, n_sequences: int, chunk_size: int | None = None) -> torch.Tensor:
    """Sum of log p(token) over each sequence's supervised tokens: (n_sequences,).

    `batch["sequence"]` gives every position's sequence index (packed rows hold several). As in
    `causal_lm_loss_sum`, logits exist only at supervised positions; here one chunk at a time under
    activation checkpointing, since each sequence's sum gets its own gradient weight (DPO).
    """
    return sequence_logprobs_and_aux(model, batch, n_sequences, chunk_size)[0]


def sequence_logprobs_and_aux(model, batch: dict, n_sequences: int, chunk_size: int | None = None):
    """`sequence_logprobs` and the router's load-balancing loss of the same forward (None unless the model's config
    asks for it: `output_router_logits`)."""
    (rows, cols), targets = supervised_positions(batch["labels"])
    owner = batch["sequence"][:, 1:][rows, cols]
    hidden, logits, aux_loss = supervised_forward(model, batch, rows, cols)
    if logits is not None:
        token_logps = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    else:
        weight = backbone_and_head(model)[1].weight
        chunk_size = chunk_size or chunk_rows(weight.shape[0])
        token_logps = torch.cat([
            torch.utils.checkpoint.checkpoint(_token_logprobs, hidden[rows[s : s + chunk_size], cols[s : s + chunk_size]], weight,
                                              targets[s : s + chunk_size], use_reentrant=False)
            for s in range(0, len(targets), chunk_size)
        ]) if len(targets) else hidden.sum((0, 2))[:0]
    logps = torch.zeros(n_sequences, dtype=token_logps.dtype, device=token_logps.device).index_add(0, owner, token_logps)
    return logps, aux_loss


def _token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return upcast(hidden @ weight.T).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


IMAGE_KEYS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")  # a vision-language batch's images (collate.py)


def model_inputs(batch: dict, config) -> dict:
    """What the model takes of a batch. Vision-language models use multimodal rotary positions (M-RoPE: temporal,
    height, width) and keep packed samples apart only when given the text positions as a fourth row before them
    ([4, batch, length], transformers' layout for packed input); on text the three M-RoPE rows are the text positions."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", *BOUNDARY_KEYS, *IMAGE_KEYS) if k in batch}
    positions = inputs.get("position_ids")
    if positions is not None and positions.ndim == 2 and is_vision_language(config):
        inputs["position_ids"] = positions[None].expand(4, *positions.shape)
    return inputs


class SupervisedForward(NamedTuple):
    hidden: torch.Tensor | None  # final hidden states (batch, seq, dim); None under ZeRO-3
    logits: torch.Tensor | None  # under ZeRO-3: fp32 logits at the supervised positions
    aux_loss: torch.Tensor | None  # the MoE router's load-balancing loss where the config asks for it (output_router_logits)


def supervised_forward(model, batch: dict, rows: torch.Tensor, cols: torch.Tensor) -> SupervisedForward:
    """(final hidden states, None, aux), or under ZeRO-3 (None, fp32 logits at (rows, cols), aux).

    The forward goes through the outermost wrapper (so DeepSpeed/DDP hooks run) but asks for a
    single logit; the final hidden states are captured from the decoder. Under ZeRO-3 the output
    weight is partitioned, so the model computes the logits itself, only where needed (`logits_to_keep`).
    The model is called without labels, so it adds no router loss itself: its `aux_loss` is handed on.
    """
    decoder, head = backbone_and_head(model)
    inputs = model_inputs(batch, unwrapped(model).config)
    if hasattr(head.weight, "ds_id"):  # ZeRO-3 partitioned parameter
        keep = torch.unique(cols)
        out = model(**inputs, logits_to_keep=keep, use_cache=False)
        return SupervisedForward(None, upcast(out.logits[rows, torch.searchsorted(keep, cols)]), getattr(out, "aux_loss", None))
    captured = {}
    hook = decoder.register_forward_hook(lambda m, a, out: captured.__setitem__("h", out[0]))
    try:
        out = model(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        hook.remove()
    return SupervisedForward(captured["h"], None, getattr(out, "aux_loss", None))


class LossTerms(NamedTuple):
    loss_sum: torch.Tensor  # sum of the supervised tokens' cross-entropies
    n: int  # how many supervised tokens
    aux_loss: torch.Tensor | None  # the router's load-balancing loss (see SupervisedForward), unweighted


def causal_lm_loss_terms(model, batch: dict, chunk_size: int | None = None) -> LossTerms:
    """`causal_lm_loss_sum` and the router's load-balancing loss of the same forward (training adds it; see sft)."""
    labels = batch["labels"]
    (rows, cols), targets = supervised_positions(labels)
    hidden, logits, aux_loss = supervised_forward(model, batch, rows, cols)
    if logits is not None:
        return LossTerms(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"), int(targets.numel()), aux_loss)
    return LossTerms(*chunked_cross_entropy_sum(hidden, backbone_and_head(model)[1].weight, labels, chunk_size), aux_loss)


def causal_lm_loss_sum(model, batch: dict, chunk_size: int | None = None) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropies over the batch's supervised tokens, and their count: logits only at
    supervised positions, chunked, no logits kept for backward (see `supervised_forward`)."""
    return tuple(causal_lm_loss_terms(model, batch, chunk_size)[:2])


def router_aux_loss_coef(model) -> float | None:
    """`router_aux_loss_coef` where the checkpoint's config asks for the router's load-balancing loss
    (`output_router_logits`, as transformers' Qwen MoE configs have), else None: nothing is added."""
    config = unwrapped(model).config.get_text_config()
    return float(config.router_aux_loss_coef) if getattr(config, "output_router_logits", False) else None


class LossOnlyEvaluation:
    """A Trainer mixin: evaluation needs the loss only, not the logits (which the Trainer would gather over the set)."""

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
