"""Packed rows on hybrid models (Qwen3-Next, Qwen3.5+): the Gated DeltaNet layers run once per sample.

Attention layers keep the samples of a packed row apart through the restarting `position_ids` (or the
`cu_seq_lens_*` of flash-attention). A linear-attention layer has no such mask: its causal convolution
window (4 tokens) and its recurrent state run along the whole row, so each sample would start from the
end of the previous one. transformers' PyTorch path takes no sequence boundaries (and refuses them
without the fla package), so the packed collators pass `cu_seq_lens_q` and `split_linear_attention`
makes every linear-attention layer run on each sample's slice of the row and join the results: what
each sample would compute alone, with the same kernels, and no compute on padding.
"""

from __future__ import annotations

import functools
import types

import torch

# The packed row's boundaries, as transformers' flash-attention kwargs name them (data.collate adds them).
BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def linear_attention_layers(model) -> list[torch.nn.Module]:
    """The token mixers of every `linear_attention` layer (GatedDeltaNet in qwen3_next, qwen3_5, qwen3_5_moe)."""
    return [m for m in model.modules() if getattr(m, "layer_type", None) == "linear_attention" and hasattr(m, "conv1d")]


def split_linear_attention(model) -> None:
    """Make every linear-attention layer of `model` honour `cu_seq_lens_q` (idempotent). A bound method, so that a
    deep copy of the model (a reference model) runs its own layers."""
    for layer in linear_attention_layers(model):
        layer.forward = types.MethodType(_forward_per_sample, layer)


def splits_packed_rows(model) -> bool:
    """Whether every linear-attention layer of `model` (none: trivially) keeps packed samples apart."""
    return all(getattr(layer.forward, "__func__", None) is _forward_per_sample for layer in linear_attention_layers(model))


def _forward_per_sample(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
    forward = functools.partial(type(self).forward, self)
    bounds = kwargs.pop("cu_seq_lens_q", None)
    for key in BOUNDARY_KEYS:
        kwargs.pop(key, None)
    if bounds is None or cache_params is not None:  # one sample per row: generation, padded batches
        return forward(hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs)
    if hidden_states.shape[0] != 1:
        raise ValueError(f"cu_seq_lens_q describes one packed row; got a batch of {hidden_states.shape[0]} rows")
    bounds = bounds.tolist()
    return torch.cat([
        forward(hidden_states[:, start:end], cache_params=None,
                attention_mask=None if attention_mask is None else attention_mask[:, start:end], **kwargs)
        for start, end in zip(bounds, bounds[1:])
    ], dim=1)
