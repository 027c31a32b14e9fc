"""A tiny random Llama with a tokenizer trained on the spot: every stage runs on it in seconds,
with no download. Used by the test suite and handy for testing a new defense or attack."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: Small settings under which each stateful defense's state changes within a few steps of a
#: tiny run (the checkpoint and resume tests compare that state after a kill).
QUICK_STATE_OPTIONS: dict[str, dict[str, Any]] = {
    "lisa": {"alignment_step": 2, "finetune_step": 1, "proximal_after": 0.2},
    "t_vaccine": {"interval_steps": 2, "probability_steps": 3, "active_layers": 1},
    "tar": {"inner_steps": 2, "tr_every": 1, "adversary_batch_size": 1},
    "booster": {"harmful_batch_size": 2},
    "repnoise": {"harmful_batch_size": 2},
    "panacea": {"harmful_batch_size": 2},
}

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]


def build_tiny_llama(
    folder: Path,
    corpus: Iterable[str],
    vocab_size: int = 512,
    hidden_size: int = 32,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised Llama and a byte-level BPE tokenizer (with a ChatML chat
    template) trained on ``corpus`` into ``folder``; return the folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        list(corpus),
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def demo_corpus() -> list[str]:
    """Text of the embedded demo pack, to train the tiny tokenizer on."""
    import json
    from importlib.resources import files

    demo = files("hftlab.data") / "demo"
    lines: list[str] = []
    for name in ("harmful.jsonl", "sentiment.jsonl", "harmless.jsonl"):
        for line in (demo / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                lines.extend(str(v) for v in json.loads(line).values())
    return lines
