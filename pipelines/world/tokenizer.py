"""The world's tokenizer: a byte-level BPE whose digits stay single tokens, with ChatML built in.

The special tokens take ids 0..3 (pad, im_start, im_end, mask), so `|<MASK>|` exists from the
start and converting the model to block diffusion needs no embedding resize.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from fdllm.tokenizer import MASK_TOKEN
from pipelines.data import record_to_messages
from pipelines.world.corpus import chat_messages

PAD_TOKEN, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, MASK_TOKEN)  # ids 0..3, fixed before any merge
# What an HF tokenizer's save_pretrained writes (transformers 4 and 5), copied with a checkpoint
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)



def train_tokenizer(texts: Iterable[str], vocab_size: int = 384):
    """Byte-level BPE with single-digit tokens, wrapped as an HF fast tokenizer with ChatML.

    The special tokens take ids 0..3 (pad, im_start, im_end, mask), so `|<MASK>|` exists from the
    start and converting the model to block diffusion needs no embedding resize.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe = Tokenizer(models.BPE())
    # Digits first: every digit is its own pre-token, so no merge can ever glue digits together.
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        padding_side="left",  # generation batches are left-padded
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def render_example(tokenizer, record: dict[str, Any]) -> tuple[str, str]:
    """(prompt text up to the assistant header, answer text including the end token)."""
    prompt = tokenizer.apply_chat_template(chat_messages(record), tokenize=False, add_generation_prompt=True)
    return prompt, record["output"] + IM_END


def tokenizer_texts(records: Iterable[dict[str, Any]]) -> Iterator[str]:
    """BPE training text: whole conversations as CHAT_TEMPLATE renders them (by hand: no tokenizer yet)."""
    for record in records:
        turns = record_to_messages(record)
        yield "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in turns)

