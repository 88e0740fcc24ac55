"""Tokenizer: the checkpoint's `tokenizer.json` through HF `tokenizers`, and a small byte-level
BPE built at generation time for synthetic checkpoints (every byte is a token, so any text,
emoji included, round-trips; every id of the model's vocabulary decodes to printable text)."""
from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"

# A little text for the synthetic tokenizer's merges; the model is random, so only coverage matters.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A model serves tokens; the server streams them.
DeepSeek-V4 mixes sliding-window, compressed sparse and heavily compressed attention layers.
Mixture-of-experts layers route every token to a few experts and one shared expert.
Inference engineers measure time per output token, throughput, and correctness of every token.
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000, punctuation ,.;:!?()[]{}<>"' and symbols +-*/=%&#@$.
Bonjour, ça va? Grüße aus München. こんにちは世界. 你好，世界。 Привет, мир! 🙂🚀
def main():\n    print("hello world")\n    return 0\n
"""


def build_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """A byte-level BPE tokenizer with exactly vocab_size tokens; ids 0 and 1 are BOS and EOS. The
    corpus yields a few hundred merges; the ids above them are filler words (" w1234"), which no
    text encodes to, so that whatever ids a random model emits, the stream shows text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS_TOKEN, EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    if tok.get_vocab_size() < vocab_size:
        spec = json.loads(tok.to_str())
        vocab = spec["model"]["vocab"]
        fillers = (f"Ġw{i}" for i in range(vocab_size * 2) if f"Ġw{i}" not in vocab)  # Ġ: the byte-level space
        for token_id, word in zip(range(tok.get_vocab_size(), vocab_size), fillers):
            vocab[word] = token_id
        tok = Tokenizer.from_str(json.dumps(spec))
    return tok


def load_tokenizer(path) -> Tokenizer:
    return Tokenizer.from_file(str(path))
