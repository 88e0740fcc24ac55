"""Host time the engine spends detokenizing per decode step (CPU, one run): a batch of B sequences
at output length L, each step one new token per sequence. Compares the windowed incremental
detokenizer (backend.engine.detokenizer) with decoding each whole output every step (what it did
before), on the synthetic byte-level BPE tokenizer (4096 ids).

    python -m bench.detokenize
"""
import time
from pathlib import Path

from backend.engine.detokenizer import IncrementalDetokenizer
from backend.tokenizer import build_tokenizer

BATCHES, LENGTHS = (8, 32, 128), (32, 512, 2048)


def main():
    tok = build_tokenizer(4096)
    text = Path(__file__).with_name("NOTES.md").read_text(encoding="utf-8")  # any long real text
    ids = tok.encode(text * (1 + 2048 * 4 // len(text))).ids
    print("| batch | output length | whole decode ms per step | windowed ms per step | ratio |")
    print("|---|---|---|---|---|")
    for batch in BATCHES:
        for length in LENGTHS:
            seqs = [ids[i * 7:i * 7 + length] for i in range(batch)]
            steps = range(length - 4, length)  # the last steps, at full length
            start = time.perf_counter()
            for n in steps:
                for s in seqs:
                    tok.decode(s[:n])
            whole = (time.perf_counter() - start) / len(steps)
            detoks = [IncrementalDetokenizer(tok, []) for _ in seqs]
            for d, s in zip(detoks, seqs):  # streamed up to the measured steps
                for n in range(1, length - 4):
                    d.update(s[:n])
            start = time.perf_counter()
            for n in steps:
                for d, s in zip(detoks, seqs):
                    d.update(s[:n])
            windowed = (time.perf_counter() - start) / len(steps)
            print(f"| {batch} | {length} | {whole * 1e3:.3f} | {windowed * 1e3:.3f} | {whole / windowed:.0f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
