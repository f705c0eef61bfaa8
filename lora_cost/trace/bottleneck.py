"""Bottleneck adapters (Houlsby, Pfeiffer) as the `adapters` library builds them, for the trace engine.

The library (adapters 1.3.0) pins transformers 4.57, so it cannot run beside transformers 5; this
module follows its code: `methods/modeling.py` Adapter (adapter_down = Sequential(Linear(d, m), act),
adapter_up = Linear(m, d), `up * scaling` with scaling 1.0, dropout, `+ residual`, pre_forward and
post_forward) and `methods/bottleneck.py` BottleneckLayer.bottleneck_layer_forward, inserted where its
model integrations insert it:
  - BERT/RoBERTa (`models/bert/modeling_bert.py` BertSelfOutputWithAdapters / BertOutputWithAdapters):
    the SelfOutput and Output modules run dense, dropout, then the layer with the module's LayerNorm;
  - GPT-2 and Llama (`models/gpt2/modeling_gpt2.py`, `models/llama/modeling_llama.py`): the layer takes the
    attention (resp. MLP) output and the residual stream, no LayerNorm. Here it is hooked the way the
    library's own `init_bottleneck` hooks a model (`hook_fn`, `_residual_hook_fn`): a forward pre-hook on
    the norm before the sublayer keeps the residual stream, a forward hook on the sublayer returns the
    adapter's output, and the block adds the stream itself (post_forward's `+ input_tensor`: the same
    add, operands swapped).
`train_adapter` freezes the whole model and unfreezes the adapters (freeze_model): LayerNorms stay frozen.
"""

from __future__ import annotations

import types

import torch
from torch import nn

SUBLAYER = {  # family: (attention-output module, pre-norm before the feed-forward, feed-forward module)
    "gpt2": ("attn", "ln_2", "mlp"),
    "llama": ("self_attn", "post_attention_layernorm", "mlp"),
}


class Adapter(nn.Module):
    """The library's Adapter with the DoubleSeqBnConfig / SeqBnConfig defaults (no ln_before/after, no
    gating, residual_before_ln=True, original_ln_after=True, scaling 1.0)."""

    def __init__(self, d: int, m: int, non_linearity: str, original_ln_before: bool, dropout: float, dtype) -> None:
        super().__init__()
        act = nn.SiLU() if non_linearity == "swish" else nn.ReLU()  # transformers ACT2CLS "swish" / "relu"
        self.adapter_down = nn.Sequential(nn.Linear(d, m, dtype=dtype), act)
        self.adapter_up = nn.Linear(m, d, dtype=dtype)
        self.scaling = 1.0
        self.dropout = nn.Dropout(p=dropout)
        self.original_ln_before = original_ln_before

    def pre_forward(self, hidden_states, input_tensor, layer_norm):
        residual = hidden_states  # residual_before_ln=True
        if self.original_ln_before:
            hidden_states = hidden_states + input_tensor
            if layer_norm is not None:
                hidden_states = layer_norm(hidden_states)
        return hidden_states, residual

    def forward(self, x, residual_input):
        down = self.adapter_down(x)
        up = self.adapter_up(down)
        up = up * self.scaling
        output = self.dropout(up)
        return output + residual_input  # adapter_residual_before_ln=False, no ln_after

    def layer(self, hidden_states, input_tensor, layer_norm, original_ln_after: bool = True):
        """BottleneckLayer.bottleneck_layer_forward with one active adapter (Stack(name): pre_block,
        compose_single, post_forward)."""
        hidden, residual = self.pre_forward(hidden_states, input_tensor, layer_norm)
        out = self(hidden, residual)
        if original_ln_after:
            out = out + input_tensor
            if layer_norm is not None:
                out = layer_norm(out)
        return out


def _post_norm_forward(self, hidden_states, input_tensor):
    """BertSelfOutputWithAdapters.forward / BertOutputWithAdapters.forward."""
    hidden_states = self.dropout(self.dense(hidden_states))
    return self.bottleneck_adapter.layer(hidden_states, input_tensor, self.LayerNorm)


def _family(model) -> str:
    model_type = model.config.model_type
    if model_type in ("bert", "roberta"):
        return "bert"
    if model_type == "gpt2":
        return "gpt2"
    return "llama"


def _blocks(model):
    base = model.base_model
    if hasattr(base, "h"):
        return list(base.h)
    if hasattr(base, "encoder"):
        return list(base.encoder.layer)
    return list(base.layers)


def attach_bottleneck(model: nn.Module, *, points, non_linearity: str, original_ln_before: bool,
                      reduction_factor: int, dropout: float) -> int:
    """Freeze the model and add an adapter at each of `points` ("attention", "ffn") of every block;
    returns how many were added."""
    for p in model.parameters():
        p.requires_grad_(False)
    d = model.config.hidden_size
    m = max(d // reduction_factor, 1)
    dtype = next(model.parameters()).dtype
    family = _family(model)
    count = 0
    for block in _blocks(model):
        for point in points:
            adapter = Adapter(d, m, non_linearity, original_ln_before, dropout, dtype).to(next(model.parameters()).device)
            if family == "bert":
                host = block.attention.output if point == "attention" else block.output
                host.bottleneck_adapter = adapter
                host.forward = types.MethodType(_post_norm_forward, host)
            else:
                attn, pre_ffn, ffn = SUBLAYER[family]
                holder = {}
                if point == "attention":
                    host, pre = getattr(block, attn), None
                    block.attention_adapters = adapter
                else:
                    host, pre = getattr(block, ffn), getattr(block, pre_ffn)
                    block.output_adapters = adapter
                if original_ln_before and pre is not None:  # only Pfeiffer's pre_forward reads the residual stream
                    pre.register_forward_pre_hook(lambda mod, args, holder=holder: holder.__setitem__("x", args[0]))
                host.register_forward_hook(_sublayer_hook(adapter, holder, point == "attention"))
            count += 1
    return count


def _sublayer_hook(adapter: Adapter, holder: dict, returns_tuple: bool):
    """hook_fn of the library: the sublayer's output through the adapter (original_ln_after is left to
    the block's own residual add, as in the library's hooked mode)."""
    def hook(module, args, output):
        h = output[0] if returns_tuple else output
        # pop: the stream is the block's to keep, as in the library's model integrations (GPT2BlockWithAdapters,
        # LlamaDecoderLayerWithAdapters pass it as an argument); holding it here would outlive the forward
        out = adapter.layer(h, holder.pop("x", None), None, original_ln_after=False)
        return (out,) + tuple(output[1:]) if returns_tuple else out
    return hook


def adapter_parameter_count(d: int, m: int) -> int:
    """Parameters of one reference Adapter, counted on a meta-device instance."""
    with torch.device("meta"):
        a = Adapter(d, m, "relu", False, 0.0, torch.float32)
    return sum(p.numel() for p in a.parameters())
