"""A sentence-transformers model directory of any BERT shape, built offline: random weights, the bundled
model's WordPiece tokenizer. Its vectors mean nothing; its memory and speed are those of the shape.

    python -m loadtest.synthetic_model --out reports/bert-768 --hidden 768 --layers 12 --max-seq-length 384

Used where a width or a depth other than the bundled model's must be measured (a 768-dimension,
384-token model stands for all-mpnet-base-v2 and the e5/bge base models) and no hub can be reached.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from app.backend import resolve_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def build(out: Path, *, hidden: int, layers: int, heads: int, max_seq_length: int, seed: int = 0) -> Path:
    """Write the model directory ``out`` (replaced if it exists) and return it."""
    import torch
    from transformers import BertConfig, BertModel

    bundled = Path(resolve_model("all-minilm-l6-v2").location)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=max(512, max_seq_length),
    )
    BertModel(config).save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(bundled / name, out / name)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    (out / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": hidden, "pooling_mode_mean_tokens": True}
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--max-seq-length", type=int, default=384)
    args = parser.parse_args()
    build(args.out, hidden=args.hidden, layers=args.layers, heads=args.heads, max_seq_length=args.max_seq_length)
    print(f"{args.out}: BERT {args.layers} layers x {args.hidden}, {args.max_seq_length} tokens, random weights")


if __name__ == "__main__":
    main()
