"""A tiny, offline stand-in for a Llama 3 / 3.2 Hugging Face folder: a byte-level BPE
tokenizer.json (special tokens after the learned ones, BOS <|begin_of_text|>, EOS <|end_of_text|>,
a post-processor that prepends BOS, as Llama 3's) and a LlamaForCausalLM written by transformers
with tied embeddings, grouped-query attention and Llama 3.2's RoPE scaling (rope_type llama3,
factor 32)."""
from __future__ import annotations

import json
from pathlib import Path

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}


def write_bpe_tokenizer(folder: Path, text: str, vocab_size: int = 400) -> int:
    """tokenizer.json + tokenizer_config.json in `folder`; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens([BOS, EOS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS}))
    return tok.get_vocab_size()


def write_tiny_llama3(folder: Path, text: str, seed: int = 0) -> Path:
    """The tokenizer and a 4-layer Llama 3.2-shaped checkpoint (vocabulary = the tokenizer's)."""
    import torch
    import transformers
    vocab = write_bpe_tokenizer(folder, text)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
        rope_theta=500000.0, rope_scaling=dict(ROPE), tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=vocab - 2, eos_token_id=vocab - 1)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # beyond the 0.02 init, so that every block changes the prediction
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed_tokens" not in name:
                p.normal_(0, 1.5 / p.shape[1] ** 0.5)
    model.save_pretrained(str(folder))
    return folder
