"""The distance to the machine's limit: model FLOPs of a training run and the matmul peak measured on this machine.

Model FLOPs count only what training must compute (the MFU convention): per real token, 2 FLOPs a block
parameter forward and 4 backward (2 when the weight is frozen: LoRA / Q-LoRA need the gradients of the
activations, not of the weights); the output projection only at positions whose next token is supervised
(logits elsewhere are not needed); causal attention 6 x layers x width x length^2 per sequence (the
score and value matmuls, 4 x length^2 x width forward, half of it masked, and twice that backward) in full-attention
layers; in a linear-attention (Gated DeltaNet) layer 18 x the recurrent state per token (the state is read against
the key, updated and read against the query: 3 x 2 FLOPs an element forward, twice that backward). Padding, recomputation and
logits at unsupervised positions are work a configuration chose, not work the model needs.
"""

from __future__ import annotations

import time


def flops_per_token(counts: dict, lengths: list[int], supervised: list[int], frozen_weights: bool) -> float:
    """Model FLOPs per real token, averaged over the samples of a data set (`lengths`, `supervised` per sample)."""
    per_param = 4 if frozen_weights else 6
    tokens = sum(lengths)
    blocks = per_param * counts["blocks"] * tokens
    head = per_param * counts["vocab_projection"] * sum(supervised)
    # forward: Q K^T and A V, 2 * s^2 * width each, half of them under the causal mask; backward twice the forward
    attention = 3 * 2 * counts["layers"] * counts["attention_width"] * sum(s * s for s in lengths)
    linear_attention = 18 * counts.get("linear_state", 0) * tokens
    return (blocks + head + attention + linear_attention) / tokens


def matmul_peak(config, dtype, device: str, rows: int = 2048, repeats: int = 5) -> tuple[float, str]:
    """(FLOP/s, which GEMM) of the fastest of the model's own matmul shapes on this machine, best of `repeats`
    timings of at least 0.2 s each (tiny shapes are repeated, so that timer noise does not flatter them)."""
    import torch

    h = config.hidden_size
    inter = getattr(config, "intermediate_size", None) or config.moe_intermediate_size
    shapes = {f"({rows} x {h}) @ ({h} x {inter})": (rows, h, inter),
              f"({rows} x {inter}) @ ({inter} x {h})": (rows, inter, h),
              f"({rows} x {h}) @ ({h} x {h})": (rows, h, h)}
    best, which = 0.0, ""
    for name, (m, k, n) in shapes.items():
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        a @ b  # warm-up
        start, times = time.perf_counter(), 0
        while time.perf_counter() - start < 0.2:
            a @ b
            times += 1
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(times):
                a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            rate = 2 * m * k * n * times / (time.perf_counter() - start)
            if rate > best:
                best, which = rate, name
    return best, which
