"""The tiny model configurations the real-step tests build (transformers config kwargs with their
model_type), the batch and length they run, and the config keys that hold dropout probabilities (set to 0
so the steps are deterministic). Torch-free: fast tests may import it."""

B, S = 2, 24
CONFIGS = {
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=3, n_head=4, vocab_size=512, n_positions=64),
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=64),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=512, max_position_embeddings=64, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=64, tie_word_embeddings=True),
    "bert": dict(model_type="bert", hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 vocab_size=512, max_position_embeddings=64, type_vocab_size=2),
    "roberta": dict(model_type="roberta", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, vocab_size=512, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1),
}
DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob")
