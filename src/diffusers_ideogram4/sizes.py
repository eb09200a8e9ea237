"""Named model sizes: the released model and a tiny one for tests, conversion checks and benchmarks."""

from .constants import TEXT_ENCODER_TAP_LAYERS, TOKEN_CHANNELS


# Transformer configs, in the hub `transformer/config.json` field names.
TRANSFORMER_SIZES = {
    "ideogram4": dict(
        in_channels=TOKEN_CHANNELS,
        num_layers=34,
        attention_head_dim=256,
        num_attention_heads=18,
        intermediate_size=12288,
        adaln_dim=512,
        llm_features_dim=4096 * len(TEXT_ENCODER_TAP_LAYERS),
        rope_theta=5_000_000,
        mrope_section=(24, 20, 20),
        norm_eps=1e-5,
    ),
    "tiny": dict(
        in_channels=TOKEN_CHANNELS,
        num_layers=2,
        attention_head_dim=64,
        num_attention_heads=2,
        intermediate_size=256,
        adaln_dim=32,
        llm_features_dim=16 * len(TEXT_ENCODER_TAP_LAYERS),
        rope_theta=5_000_000,
        mrope_section=(12, 10, 10),
        norm_eps=1e-5,
    ),
}

# Qwen3-VL text-model sizes (the vision tower is never run; the tiny one keeps it minimal).
TEXT_ENCODER_SIZES = {
    "ideogram4": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, intermediate_size=12288, vocab_size=151936),
    # 36 layers so that every tapped layer (up to 35) exists, each of width 16.
    "tiny": dict(hidden_size=16, num_hidden_layers=36, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=8, intermediate_size=32, vocab_size=512),
}
