"""The chunked supervised-only loss equals the plain full-logits loss, value and gradients.

Every SFT step goes through `causal_lm_loss_sum`; if it drifted from the textbook cross-entropy,
training would silently optimise something else. Checked on the embedded model's real hidden
states and output weight (the 151,936-word vocabulary), in fp32 tightly and in bf16 within tolerance.
"""

import pytest
import torch

from in_memory_sft import load_sft_dataset
from qwen_tune.data.chat_format import IGNORE
from qwen_tune.train.loss import causal_lm_loss_sum, chunked_cross_entropy_sum, plain_cross_entropy_sum
from qwen_tune.models.model import load_model

from helpers import DATA


@pytest.fixture(scope="module")
def model(base_model_path):
    torch.manual_seed(0)
    m = load_model(base_model_path)
    m.config.use_cache = False
    return m


@pytest.fixture(scope="module")
def batch(tokenizer, chatml):
    """Two real conversations, right-padded into one (2, seq) batch with the ChatML labels."""
    samples, _ = load_sft_dataset(f"{DATA}/sft_example.json", chatml, 512)
    a, b = samples[2], samples[5]
    width = max(len(a.input_ids), len(b.input_ids))
    ids = torch.full((2, width), tokenizer.pad_token_id)
    labels = torch.full((2, width), IGNORE)
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, s in enumerate((a, b)):
        ids[i, : len(s.input_ids)] = torch.tensor(s.input_ids)
        labels[i, : len(s.labels)] = torch.tensor(s.labels)
        mask[i, : len(s.input_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def hidden_and_weight(model, batch, dtype=torch.float32):
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    hidden = out.hidden_states[-1].to(dtype).requires_grad_()
    weight = model.get_output_embeddings().weight.detach().to(dtype).requires_grad_()
    return hidden, weight


def grads_of(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def assert_same_gradient(got, want, tol=5e-5, name=""):
    """Relative error of the whole tensor: fp32 sums over the 151,936-word softmax in another order differ by
    ~1e-5 (logits up to ~10 on the embedded model), a wrong loss by orders of magnitude more."""
    assert got.shape == want.shape and got.dtype == want.dtype, name
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert err < tol, f"{name}: relative gradient error {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("chunk_size", [7, 1024])  # many chunks with a remainder; one chunk
def test_chunked_equals_plain_fp32(model, batch, chunk_size):
    hidden, weight = hidden_and_weight(model, batch)
    chunked, n = chunked_cross_entropy_sum(hidden, weight, batch["labels"], chunk_size=chunk_size)
    plain, n_plain = plain_cross_entropy_sum(hidden @ weight.T, batch["labels"])
    assert n == n_plain == int((batch["labels"][:, 1:] != IGNORE).sum()) > 0
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-4)
    for g_chunked, g_plain in zip(grads_of(chunked, hidden, weight), grads_of(plain, hidden, weight)):
        assert_same_gradient(g_chunked, g_plain)


def test_chunked_equals_plain_bf16(model, batch):
    """bf16 hidden states and weight (mixed-precision training): close to the fp32 reference."""
    h32, w32 = hidden_and_weight(model, batch)
    ref, _ = plain_cross_entropy_sum(h32 @ w32.T, batch["labels"])
    ref_gh, ref_gw = grads_of(ref, h32, w32)
    h16, w16 = hidden_and_weight(model, batch, torch.bfloat16)
    chunked, _ = chunked_cross_entropy_sum(h16, w16, batch["labels"], chunk_size=16)
    plain16, _ = plain_cross_entropy_sum(h16 @ w16.T, batch["labels"])
    gh, gw = grads_of(chunked, h16, w16)
    assert gh.dtype == gw.dtype == torch.bfloat16  # gradients come back in the parameters' dtype
    torch.testing.assert_close(chunked, ref, rtol=1e-2, atol=0)
    torch.testing.assert_close(chunked, plain16.float(), rtol=5e-3, atol=0)  # no worse than plain bf16
    assert_same_gradient(gh.float(), ref_gh, tol=1e-2)
    assert_same_gradient(gw.float(), ref_gw, tol=1e-2)


def test_frozen_output_weight_gives_hidden_gradient_only(model, batch):
    """LoRA freezes lm_head: the loss must still backpropagate into the hidden states."""
    hidden, weight = hidden_and_weight(model, batch)
    frozen = weight.detach()
    chunked, _ = chunked_cross_entropy_sum(hidden, frozen, batch["labels"], chunk_size=5)
    plain, _ = plain_cross_entropy_sum(hidden @ frozen.T, batch["labels"])
    assert_same_gradient(grads_of(chunked, hidden)[0], grads_of(plain, hidden)[0])


def test_without_autograd_the_sum_is_the_same_and_builds_no_gradients(model, batch):
    """Evaluation and scoring (no_grad) skip the gradient buffers and matmuls the training step precomputes: the same
    sum, bit for bit, and nothing for backward."""
    hidden, weight = hidden_and_weight(model, batch)
    trained, n = chunked_cross_entropy_sum(hidden, weight, batch["labels"], chunk_size=7)
    with torch.no_grad():
        evaluated, n_evaluated = chunked_cross_entropy_sum(hidden, weight, batch["labels"], chunk_size=7)
    assert torch.equal(evaluated, trained.detach()) and n_evaluated == n
    assert evaluated.grad_fn is None and trained.grad_fn is not None


def model_grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_causal_lm_loss_sum_equals_full_logits_loss(model, batch):
    """Through the whole model: the chunked loss and gradients equal those of the full-logits loss
    (the seed's loss, which bench/sft_throughput.py runs for comparison)."""
    model.zero_grad()
    loss, n = causal_lm_loss_sum(model, batch, chunk_size=9)
    loss.backward()
    chunked_grads = model_grads(model)

    model.zero_grad()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    plain, n_plain = plain_cross_entropy_sum(model(**inputs, use_cache=False).logits, batch["labels"])
    plain.backward()
    plain_grads = model_grads(model)
    model.zero_grad()

    assert n == n_plain > 0
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=1e-4)
    assert chunked_grads.keys() == plain_grads.keys() and len(chunked_grads) > 0
    for name in chunked_grads:
        assert_same_gradient(chunked_grads[name], plain_grads[name], name=name)


def test_no_supervised_token_gives_zero_loss_not_nan(model, batch):
    """A batch with nothing supervised must not produce NaN (peers' known bug)."""
    empty = dict(batch, labels=torch.full_like(batch["labels"], IGNORE))
    loss, n = causal_lm_loss_sum(model, empty)
    assert n == 0 and loss.item() == 0.0
    loss.backward()  # still connected to the graph, so a DDP/DeepSpeed step does not hang
    model.zero_grad()
