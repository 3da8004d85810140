"""A tiny random transformers CLIP checkpoint with a word-level tokenizer, for tests."""

from __future__ import annotations

from pathlib import Path

from ovseg_jax.text import Tokenizer, VILD_TEMPLATES, write_word_vocab

CLASS_NAMES = ["red circle", "green square", "blue triangle", "yellow sky", "grass"]
CROP_SIZE = 64


def build_checkpoint(directory: Path, seed: int) -> Path:
    """Write a random tiny transformers CLIP + tokenizer to `directory` (a user-style HF folder)."""
    import torch  # optional dependency: only needed to create the demo checkpoint
    from transformers import CLIPConfig, CLIPModel

    words = sorted({w for t in VILD_TEMPLATES for w in t.replace("{}", " ").replace(".", " ").split()}
                   | {w for name in CLASS_NAMES for w in name.split()})
    write_word_vocab(words, directory)
    tok = Tokenizer.from_dir(directory, context_length=16)
    config = CLIPConfig(
        projection_dim=32,
        vision_config=dict(image_size=CROP_SIZE, patch_size=8, hidden_size=64, intermediate_size=256,
                           num_hidden_layers=2, num_attention_heads=4),
        text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=16, vocab_size=tok.vocab_size, eos_token_id=tok.eot_token_id,
                         bos_token_id=tok.sot_token_id, pad_token_id=tok.eot_token_id))
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(directory)
    tok.save(directory)
    return directory
