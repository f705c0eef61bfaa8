"""A tiny, self-contained fine-tuning script: a small GPT-2 or Llama built from its transformers
config class (random weights, nothing downloaded), peft LoRA (or full fine-tuning), AdamW, random
token ids. Plain PyTorch loop, no lora-cost imports:

    python examples/train_tiny.py --steps 6
    lora-cost profile examples/train_tiny.py -- --steps 6 --grad-accum 2
"""

import argparse

import torch


def build_model(arch: str, method: str, r: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    if arch == "gpt2":
        config = GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=512, n_positions=128,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(config)
        targets = ["c_attn"]
    else:
        config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512, max_position_embeddings=128,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = LlamaForCausalLM(config)
        targets = ["q_proj", "v_proj"]
    model.config.use_cache = False
    if method == "full":
        return model
    from peft import LoraConfig, get_peft_model
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per epoch")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args.arch, args.method, args.r).to(device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    vocab = model.config.vocab_size
    for epoch in range(args.epochs):
        for step in range(args.steps):
            for _ in range(args.grad_accum):
                ids = torch.randint(0, vocab, (args.batch, args.seq), device=device)
                loss = model(input_ids=ids, labels=ids).loss / args.grad_accum
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            print(f"epoch {epoch} step {step} loss {loss.item() * args.grad_accum:.4f}")


if __name__ == "__main__":
    main()
