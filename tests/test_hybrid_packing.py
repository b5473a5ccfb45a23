"""Every Qwen text type is trained on packed batches whose samples cannot see each other.

Packing restarts `position_ids`, which keeps samples apart in attention layers only; the linear-attention layers
of hybrid models (Qwen3-Next, Qwen3.5+: Gated DeltaNet before every fourth full-attention layer) carry their
convolution window and recurrent state across the row unless they run once per sample (linear_attention.py, which
load_model installs). So what sft, dpo and rm compute equals each sample alone, and one training step packed equals
one step padded. Tiny random checkpoints of each type are built from config (no download), with the embedded
model's tokenizer, in float64 so that equality tests the layout, not summation order.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from helpers import DATA
from qwen_tune.data.chat_format import IGNORE, resolve_format
from qwen_tune.data.collate import (PackedCollator, PackedPairCollator, PaddedCollator, PaddedPairCollator, PromptCollator,
                                    UnpairedCollator)
from qwen_tune.data.distill_prompts import encode_distill_prompts
from qwen_tune.data.pairs import encode_pairs
from qwen_tune.data.unpaired import encode_unpaired
from qwen_tune.models.linear_attention import BOUNDARY_KEYS, linear_attention_layers, split_linear_attention
from qwen_tune.models.model import packing_for, packing_is_exact
from qwen_tune.models.tokenizer import save_tokenizer
from qwen_tune.rl.reward_models import score_token_ids
from qwen_tune.train.divergence import ReplyLogits, reply_divergences
from qwen_tune.train.loss import causal_lm_loss_sum, sequence_logprob_terms, sequence_logprobs, supervised_positions

ATTENTION_ONLY = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe")
HYBRID = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
# vision-language (a language model and a vision tower), trained on text as their own class; the Qwen3.5 ones are hybrid
COMPOSITE = ("qwen3_5", "qwen3_5_moe", "qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl", "qwen4_exp")
# Qwen4-Exp's indexed (query-sparse) attention selects keys from compressed blocks of the row: not packed, padded
NOT_PACKED = ("qwen4_exp",)
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
             moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
             vocab_size=151936, tie_word_embeddings=True)
LINEAR_ATTENTION = HYBRID + ("qwen3_5", "qwen3_5_moe")
VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
# the ids of the embedded (Qwen2.5 / Qwen3) tokenizer's vision tokens; Qwen3.5's own 248k vocabulary has others
VISION_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def tiny_config(model_type: str):
    from transformers import AutoConfig

    if model_type not in COMPOSITE:
        return AutoConfig.for_model(model_type, **SMALL)
    text = dict(SMALL, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})  # head_dim 16
    if model_type == "qwen4_exp":  # its indexer has no defaults
        text.update(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8, indexer_compress_ratio=4)
    return AutoConfig.for_model(model_type, text_config=text, vision_config=VISION, tie_word_embeddings=True, **VISION_TOKENS)


def save_tiny_checkpoint(model_type: str, path, tokenizer) -> str:
    """A float32 checkpoint of `model_type` (a composite one as its own class) with the tokenizer, as a user brings one."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(0)
    model_class = AutoModelForImageTextToText if model_type in COMPOSITE else AutoModelForCausalLM
    config = tiny_config(model_type)
    model_class.from_config(config).save_pretrained(path)
    save_tokenizer(tokenizer, path)  # with added_tokens_decoder, as Qwen releases ship it
    if model_type in COMPOSITE:  # the image processor, as a released checkpoint has it
        tiny_image_processor(config).save_pretrained(path)
    return str(path)


def tiny_image_processor(config):
    """The image processor of a composite config (its vision tower's patch and merge sizes), with a small pixel budget."""
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(patch_size=config.vision_config.patch_size, merge_size=config.vision_config.spatial_merge_size,
                                 temporal_patch_size=config.vision_config.temporal_patch_size, min_pixels=32 * 32,
                                 max_pixels=128 * 128)


def tiny_model(model_type: str, model_class=None):
    """A random float64 model of `model_type` (a composite one as its own class), its linear-attention layers split
    per sample as load_model does: a fresh copy of the same weights on every call."""
    return copy.deepcopy(_built(model_type, model_class)).eval()


@functools.lru_cache(maxsize=16)
def _built(model_type: str, model_class):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(0)
    model_class = model_class or (AutoModelForImageTextToText if model_type in COMPOSITE else AutoModelForCausalLM)
    # the experts' grouped GEMM has no float64 kernel: the per-expert loop computes the same
    model = model_class.from_config(tiny_config(model_type), dtype=torch.float64, experts_implementation="eager")
    split_linear_attention(model)
    return model


def unsplit(model):
    """The model as transformers runs it: linear attention along the whole row (the check's control)."""
    for layer in linear_attention_layers(model):
        del layer.forward
    return model


def without_boundaries(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in BOUNDARY_KEYS}


def one_by_one_loss(model, features):
    return sum(causal_lm_loss_sum(model, PackedCollator()([f]))[0] for f in features)


@pytest.mark.support("packing", [t for t in ATTENTION_ONLY + HYBRID + COMPOSITE if t not in NOT_PACKED])
@pytest.mark.parametrize("model_type", ATTENTION_ONLY + HYBRID + COMPOSITE)
def test_sft_packed_batches_equal_each_sample_alone_on_every_qwen_type(model_type, conversations):
    """sft's default batch is packed on every type but Qwen4-Exp (padded, one line says why) and gives the loss of each
    sample alone, in float64: sums of a few hundred token losses agree to ~1e-12, a sample seeing another one moves
    the loss by far more."""
    from qwen_tune.options import load
    from qwen_tune.methods.sft import METHOD, collator_for

    model = tiny_model(model_type)
    lines = []
    config = load(METHOD, ["--data_path", f"{DATA}/sft_example.json", "--output_dir", "/nonexistent"])
    collator = collator_for(config.layout, config.data.model_max_length, 0, packing_for(model, config.layout.packing, lines.append))
    packed_here = model_type not in NOT_PACKED
    assert isinstance(collator, PackedCollator) == packing_is_exact(model) == packed_here
    assert lines == ([] if packed_here else [f"packing: off: {model_type} has indexed_attention layers, which would carry "
                                             "one sample into the next in a packed row; batches are padded instead"])
    with torch.no_grad():
        packed = causal_lm_loss_sum(model, collator(conversations))[0]
        alone = one_by_one_loss(model, conversations)
        torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-9)
        if model_type in LINEAR_ATTENTION:  # what the row would give without the split: the check above can fail
            mixed = causal_lm_loss_sum(unsplit(model), without_boundaries(collator(conversations)))[0]
            assert abs(mixed - alone) > 1e-4


@pytest.mark.parametrize("model_type", [t for t in ATTENTION_ONLY + HYBRID + COMPOSITE if t not in NOT_PACKED])
def test_packed_logits_equal_each_sample_alone_token_by_token(model_type, conversations):
    """Not only the sums: every position's logits in the packed row equal that sample's own, in float64 (1e-9 of
    logits of order 1; a sample that saw its neighbour is off by far more, as the loss test shows)."""
    from qwen_tune.train.loss import model_inputs

    model = tiny_model(model_type)
    collate = PackedCollator()
    with torch.no_grad():
        packed = model(**model_inputs(collate(conversations), model.config), use_cache=False).logits[0]  # as training
        alone = torch.cat([model(**model_inputs(collate([c]), model.config), use_cache=False).logits[0] for c in conversations])
    assert packed.shape == alone.shape
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-9)


def test_a_hybrid_model_whose_layers_are_not_split_is_padded_and_says_so():
    """A model built without load_model (or a layer type we do not know) is not packed: one line says why."""
    model = unsplit(tiny_model("qwen3_5_text"))
    lines = []
    assert not packing_is_exact(model) and not packing_for(model, True, lines.append)
    assert lines == ["packing: off: qwen3_5_text has linear_attention layers, which would carry one sample into the next "
                     "in a packed row; batches are padded instead"]
    assert packing_for(model, False, lines.append) is False and len(lines) == 1


def gradients(model, batch: dict) -> dict[str, torch.Tensor]:
    loss_sum, n = causal_lm_loss_sum(model.train(), batch)
    (loss_sum / n).backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def largest_relative_difference(grads: dict, reference: dict) -> float:
    assert grads.keys() == reference.keys()
    return max(float((grads[name] - reference[name]).norm() / reference[name].norm()) for name in reference)


@pytest.mark.support("full", [t for t in ATTENTION_ONLY + HYBRID + COMPOSITE if t not in NOT_PACKED])
@pytest.mark.parametrize("model_type", [t for t in ATTENTION_ONLY + HYBRID + COMPOSITE if t not in NOT_PACKED])
def test_one_training_step_packed_equals_one_step_padded(model_type, conversations):
    """The gradient of the mean token loss, packed vs padded (each sample alone in its row), on every parameter, so
    the AdamW step after it is the same update. transformers computes the delta rule in float32 whatever the dtype,
    and a bias's gradient sums thousands of token terms that mostly cancel, so hybrids agree to ~1e-5 of each
    tensor's norm (1e-12 on attention-only types); a row whose samples see each other is off by 4-13%."""
    model = tiny_model(model_type)
    padded = gradients(model, PaddedCollator(0)(conversations))
    language_model = [name for name, _ in model.named_parameters() if "visual" not in name.split(".")]
    assert sorted(padded) == sorted(language_model)  # (no image in the batch: the vision tower has no gradient)
    packed = gradients(tiny_model(model_type), PackedCollator()(conversations))
    assert largest_relative_difference(packed, padded) < (1e-4 if model_type in LINEAR_ATTENTION else 1e-10)
    if model_type in LINEAR_ATTENTION:
        mixed = gradients(unsplit(tiny_model(model_type)), without_boundaries(PackedCollator()(conversations)))
        assert largest_relative_difference(mixed, padded) > 1e-2


def alone_logprob(model, prompt: list[int], reply: list[int]) -> torch.Tensor:
    """log p(reply | prompt) with the sequence alone in its batch."""
    batch = {"input_ids": torch.tensor([prompt + reply]), "labels": torch.tensor([[IGNORE] * len(prompt) + reply]),
             "sequence": torch.zeros(1, len(prompt) + len(reply), dtype=torch.long)}
    return sequence_logprobs(model, batch, 1)[0]


@pytest.mark.parametrize("model_type", ATTENTION_ONLY + HYBRID + COMPOSITE)
def test_preference_batches_equal_each_sequence_alone_on_every_qwen_type(model_type, tokenizer):
    """dpo's batch of pairs (packed but on Qwen4-Exp, and the padded layout on every type; orpo's and simpo's too) and
    kto's batch of replies with its KL estimate's mismatched ones: each sequence's log-probability equals the sequence
    alone (float64, as above), and its token count (the length normalisation of orpo and simpo) is its reply's length."""
    model = tiny_model(model_type)
    fmt = resolve_format(copy.copy(tokenizer))
    pairs, _ = encode_pairs(f"{DATA}/preference_example.jsonl", fmt, 512, split_prompt=True)
    features = [pairs[i] for i in range(3)]
    packing = packing_for(model, True, print)  # as dpo.run decides
    assert packing == (model_type not in NOT_PACKED)
    with torch.no_grad():
        packed = sequence_logprob_terms(model, (PackedPairCollator() if packing else PaddedPairCollator(0))(features), 6)
        padded = sequence_logprob_terms(model, PaddedPairCollator(0)(features), 6)
        reply_lengths = torch.tensor([len(f[side]) for side in ("chosen_ids", "rejected_ids") for f in features])
        assert packed.counts.tolist() == padded.counts.tolist() == reply_lengths.tolist()
        packed, padded = packed.sums, padded.sums
        alone = torch.stack([alone_logprob(model, f["prompt_ids"], f[side]) for side in ("chosen_ids", "rejected_ids") for f in features])
        torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(padded, alone, rtol=1e-10, atol=1e-9)
        replies = encode_unpaired(f"{DATA}/kto_example.jsonl", fmt, 512)[0].select(range(3))
        batch = UnpairedCollator(packing, 0)(list(replies))
        for rows, shift in ((batch, 0), (batch["kl"], 1)):  # sample i with its own reply, then with sample i-1's
            unpaired_alone = torch.stack([alone_logprob(model, f["prompt_ids"], replies[(i - shift) % 3]["completion_ids"])
                                          for i, f in enumerate(replies)])
            torch.testing.assert_close(sequence_logprobs(model, rows, 3), unpaired_alone, rtol=1e-10, atol=1e-9)
        if model_type in LINEAR_ATTENTION:
            mixed = sequence_logprobs(unsplit(model), without_boundaries(PackedPairCollator()(features)), 6)
            assert (mixed - alone).abs().max() > 1e-4


@pytest.mark.parametrize("model_type", ATTENTION_ONLY + HYBRID + COMPOSITE)
def test_distillation_divergences_of_a_batch_equal_each_sequence_alone_on_every_qwen_type(model_type, tokenizer):
    """distill's batch of prompts with their replies (packed but on Qwen4-Exp): the divergence at every reply position
    between the student and a teacher of the same type with other weights equals that of each sequence alone."""
    student, teacher = tiny_model(model_type), tiny_model(model_type)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    prompts, _ = encode_distill_prompts(f"{DATA}/distill_example.jsonl", resolve_format(copy.copy(tokenizer)), 512, max_new_tokens=8)
    sides = [(row["reply_prompt_ids"], row["reply_ids"]) for row in prompts if row["reply_ids"]][:2]
    collator = PromptCollator(packing_for(student, True, print), 0)  # as distill.run decides

    def divergences(batch):
        (rows, cols), _ = supervised_positions(batch["labels"])
        return reply_divergences(ReplyLogits(student, batch, rows, cols), ReplyLogits(teacher, batch, rows, cols), 0.5)

    with torch.no_grad():
        together = divergences(collator.rows(sides))
        alone = torch.cat([divergences(collator.rows([side])) for side in sides])
    assert len(together) == sum(len(reply) for _, reply in sides) and together.min() > 0
    torch.testing.assert_close(together, alone, rtol=1e-10, atol=1e-9)


def with_reward_head(model_types) -> list[str]:
    """The types transformers has a sequence-classification class for (rm's model)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    return [t for t in model_types if t in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES]


@pytest.mark.parametrize("model_type", with_reward_head(ATTENTION_ONLY + HYBRID + COMPOSITE))
def test_reward_scores_of_a_padded_batch_equal_each_sequence_alone(model_type, tokenizer):
    """rm trains and scores right-padded batches (TRL's collator, score_token_ids): the score read at each sequence's
    last token equals the sequence scored alone, on every type with a reward-model class (float64)."""
    from transformers import AutoModelForSequenceClassification

    model = tiny_model(model_type, AutoModelForSequenceClassification)
    model.config.get_text_config().pad_token_id = 0  # as reward_model.load_reward_model sets it
    pairs, _ = encode_pairs(f"{DATA}/preference_example.jsonl", resolve_format(copy.copy(tokenizer)), 512)
    sequences = [pairs[i][side] for i in range(3) for side in ("chosen_ids", "rejected_ids")]
    assert len({len(s) for s in sequences}) > 1  # the batch is really padded
    batched = score_token_ids(model, sequences)
    alone = torch.cat([score_token_ids(model, [s]) for s in sequences])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-6)  # score_token_ids returns float32
