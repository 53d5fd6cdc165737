"""Write the CLIP BPE tokenizer (vocab.json, merges.txt) that the package ships.

The OpenAI CLIP vocabulary (MIT licence) is rebuilt from the BPE merge list that the
`open_clip_torch` package carries as a data file, exactly as CLIP's own `SimpleTokenizer`
builds it: 256 byte symbols, the same with an end-of-word marker, one token per merge, then
the two special tokens. Only the data file is read; open_clip itself is never imported
(importing it needs torchvision).

    pip install --no-deps open_clip_torch
    python scripts/make_clip_tokenizer.py src/storydiffusion/assets/clip_tokenizer
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary is 49408 = 512 byte symbols + merges + 2 specials


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def open_clip_bpe_file() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise SystemExit("open_clip_torch is not installed: run `pip install --no-deps open_clip_torch`")
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


def main(out_dir: str) -> None:
    lines = gzip.open(open_clip_bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {len(tokens)} tokens to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "src/storydiffusion/assets/clip_tokenizer")
