"""The LoRA paper's parameter counts (Hu et al. 2021, arXiv:2106.09685, v2) for the rows lora-cost models:
LoRA itself and full fine-tuning, on the bundled RoBERTa, GPT-2 and GPT-3 profiles. Each count is
derived by hand beside the estimate; where the paper's printed count differs, the comment says by how
much and why, and the formula is not bent to meet it. (BitFit, prefix and adapter rows belong to those
methods' tests. DeBERTa XXL is not a bundled family: its LoRA row, 4.7M, is 48 layers x 2 x r x
(1536 + 1536) only at r = 16, while the paper's text and hyperparameter table give r = 8, 2.4M: the
slip the issue mentions.)"""

import pytest

from lora_cost import estimate

pytestmark = pytest.mark.fast


def millions(n: int, digits: int = 1) -> float:
    return round(n / 1e6, digits)


# ---- Table 2: RoBERTa on GLUE, LoRA r = 8 on W_q and W_v -------------------------------------------
@pytest.mark.parametrize("model,d,layers,printed", [
    ("roberta-base", 768, 12, 0.3),
    ("roberta-large", 1024, 24, 0.8),
])
def test_table2_roberta_lora(model, d, layers, printed):
    e = estimate(model, "lora", r=8, targets="query,value", seq=128)
    assert e.trainable_params == layers * 2 * 8 * (d + d)  # 294,912 and 786,432
    assert millions(e.trainable_params) == printed


@pytest.mark.parametrize("model,total,printed", [
    # RobertaForMaskedLM with its LM head (dense, layer norm, tied decoder, bias): 124,697,433. Table 2
    # prints 125.0M, the rounded "125M" of the RoBERTa paper (Liu et al. 2019) its fine-tuning rows come from.
    ("roberta-base", 124_697_433, 125.0),
    ("roberta-large", 355_412_057, 355.0),  # 355.4M; printed 355.0M, rounded likewise
])
def test_table2_roberta_full(model, total, printed):
    e = estimate(model, "full", seq=128)
    assert e.trainable_params == e.total_params == total
    assert round(total / 1e6) == printed


# ---- Table 3: GPT-2 medium and large on E2E, LoRA r = 4 on W_q and W_v ----------------------------------
@pytest.mark.parametrize("model,d,layers,ours,printed", [
    ("gpt2-medium", 1024, 24, 0.39, 0.35),
    ("gpt2-large", 1280, 36, 0.74, 0.77),
])
def test_table3_gpt2_lora(model, d, layers, ours, printed):
    """The paper's GPT-2 code (microsoft/LoRA examples/NLG, loralib MergedLinear with enable_lora=[True, False,
    True], lora_dim 4) adapts the q and v thirds of the fused c_attn: A is [2r, d], B is [2d, r], 4 r d per
    layer, which is also what peft's LoRA on the whole c_attn trains (r x (d + 3d)). That is 393,216 (0.39M)
    on GPT-2 M and 737,280 (0.74M) on GPT-2 L; Table 3 prints 0.35M and 0.77M, the counts of the prefix-layer
    rows beside them (Li & Liang 2021), which no rank on W_q, W_v gives (r would be 3.6 and 4.2)."""
    e = estimate(model, "lora", r=4, targets="c_attn", seq=128)
    assert e.trainable_params == layers * (2 * 4 * d + 2 * d * 4) == layers * 4 * (d + 3 * d)
    assert millions(e.trainable_params, 2) == ours != printed


@pytest.mark.parametrize("model,total,printed_hundredths,slip", [
    # GPT2LMHeadModel, tied head: 354,823,168 = 354.82M; Table 3 prints 354.92M, 0.10M more: a digit slip
    # (the row comes from Li & Liang 2021); the large model's row agrees to the last printed digit
    ("gpt2-medium", 354_823_168, 35492, 10),
    ("gpt2-large", 774_030_080, 77403, 0),
])
def test_table3_gpt2_full(model, total, printed_hundredths, slip):
    e = estimate(model, "full", seq=128)
    assert e.trainable_params == total
    assert printed_hundredths - round(total / 1e4) == slip


# ---- Table 4, 5: GPT-3 175B (96 layers, d = 12288) ------------------------------------------------------
GPT3_MATRIX = 12288 + 12288  # d_in + d_out of each attention matrix


@pytest.mark.parametrize("targets,r", [
    ("q_proj", 8), ("k_proj", 8), ("v_proj", 8), ("out_proj", 8),
    ("q_proj,k_proj", 4), ("q_proj,v_proj", 4), ("q_proj,k_proj,v_proj,out_proj", 2),
])
def test_table5_gpt3_18m_budget(targets, r):
    # Sec. 7.1, Table 5: "a parameter budget of 18M ... r = 8 if we adapt one type of attention weights or
    # r = 4 if we adapt two types, for all 96 layers" (and r = 2 for all four): 96 x 8 x 24,576 = 18,874,368
    # each, 18.9M; the paper writes 18M (truncated)
    e = estimate("gpt3-175b", "lora", r=r, targets=targets, seq=128)
    assert e.trainable_params == 96 * len(targets.split(",")) * r * GPT3_MATRIX == 18_874_368


@pytest.mark.parametrize("targets,r,printed", [
    # Table 4 prints the counts without ranks: 4.7M is rank 1 on W_q and W_v (equally rank 2 on one matrix),
    # 37.7M rank 8 on W_q and W_v (equally rank 4 on all four attention matrices)
    ("q_proj,v_proj", 1, 4.7), ("v_proj", 2, 4.7),
    ("q_proj,v_proj", 8, 37.7), ("q_proj,k_proj,v_proj,out_proj", 4, 37.7),
])
def test_table4_gpt3_lora(targets, r, printed):
    e = estimate("gpt3-175b", "lora", r=r, targets=targets, seq=128)
    assert e.trainable_params == 96 * len(targets.split(",")) * r * GPT3_MATRIX
    assert millions(e.trainable_params) == printed


def test_table4_gpt3_full():
    # Brown et al. 2020 Table 2.1 shapes: per layer 12 d^2 weights + 13 d biases and norms, token and
    # position embeddings (50,257 and 2,048 x d, the head tied), the final norm: 174,604,259,328. Table 4
    # prints 175,255.8M, 0.37% more, and says not how it counted; no embedding or head choice closes the gap
    # (651.5M is not a multiple of d), so the count follows the shapes.
    d, L = 12288, 96
    total = L * (12 * d * d + 13 * d) + (50257 + 2048) * d + 2 * d
    e = estimate("gpt3-175b", "full", seq=128)
    assert e.total_params == total == 174_604_259_328
    assert 0.003 < 175_255.8e6 / total - 1 < 0.004
