"""Trainable-parameter counts published in the methods' papers, reproduced by the estimator."""

import pytest

from lora_cost import estimate

pytestmark = pytest.mark.fast


def test_lora_paper_gpt3_175b_rq_rv_4():
    # Hu et al. 2021, Sec. 7.1 / Table 4: r_q = r_v = 4 on GPT-3 175B -> 18.9M parameters.
    # 96 layers x 2 matrices x 4 x (12288 + 12288) = 18,874,368
    e = estimate("gpt3-175b", "lora", r=4, targets="q_proj,v_proj", seq=128)
    assert e.trainable_params == 96 * 2 * 4 * (12288 + 12288) == 18_874_368


def test_roberta_base_lora_r8_qv():
    # 12 layers x 2 x 8 x (768 + 768) = 294,912 (LoRA paper Table 2 reports 0.3M for RoBERTa-base)
    e = estimate("roberta-base", "lora", r=8, seq=128)
    assert e.trainable_params == 12 * 2 * 8 * (768 + 768) == 294_912


def test_vera_roberta_base_r1024_qv():
    # VeRA paper Table 2: 43K for RoBERTa-base; per adapted matrix d_out + r = 768 + 1024
    e = estimate("roberta-base", "vera", r=1024, seq=128)
    assert e.trainable_params == 24 * (768 + 1024) == 43_008


def test_vera_llama2_7b_r1024_all_linear_vs_lora_r64():
    # VeRA paper Table 4 compares 1.6M (VeRA) with 159.9M (LoRA r=64) on Llama-2 7B.
    vera = estimate("llama-2-7b", "vera", r=1024, targets="all-linear", seq=128)
    per_layer = 4 * (4096 + 1024) + 2 * (11008 + 1024) + (4096 + 1024)
    assert vera.trainable_params == 32 * per_layer == 1_589_248
    lora = estimate("llama-2-7b", "lora", r=64, targets="all-linear", seq=128)
    per_layer = 64 * (4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096))
    assert lora.trainable_params == 32 * per_layer == 159_907_840


def test_nola_llama2_70b_k_l_512_all_linear():
    # NoLA paper Table 3: 0.57M trainable parameters on Llama-2 70B; k + l coefficients per matrix
    e = estimate("llama-2-70b", "nola", r=8, targets="all-linear", seq=128, method_options={"k": 512, "l": 512})
    assert e.trainable_params == 80 * 7 * (512 + 512) == 573_440


@pytest.mark.parametrize("model,total", [
    ("gpt2", 124_439_808),  # GPT2LMHeadModel, tied head
    ("llama-2-7b", 6_738_415_616),  # the Llama-2-7b-hf parameter count
    ("roberta-base", 124_697_433),  # RobertaForMaskedLM including the LM head bias
])
def test_total_params(model, total):
    assert estimate(model, "lora", seq=128).total_params == total
