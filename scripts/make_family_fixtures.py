"""Write tiny random-weight checkpoints of every supported text family, with sentence-transformers' embeddings.

Each family gets a sentence-transformers directory made with the real `transformers` and
`sentence-transformers` classes (hidden size 32, 2 layers, a few hundred tokens of vocabulary trained
here on the reference texts), and the embeddings sentence-transformers computes for ~60 texts after
loading that directory back.  The tests compare bulkinfer's JAX port against them without PyTorch.

Outputs (in ``--out-dir``):

* ``family_texts.json``: the input strings (empty, unicode, special-token look-alikes, long ones
  that are truncated at 64 tokens).
* ``<family>/model/``: the checkpoint (config.json, model.safetensors, tokenizer files, modules.json, ...).
* ``<family>/reference.npy``: float32 ``[N, dim]``, row ``i`` embedding text ``i``.

Families and what each one exercises:

* ``roberta``: byte-level BPE, padding index 0 (positions start at 1), mean pooling.
* ``xlm-roberta``: unigram tokenizer, padding index 1 (positions start at 2), CLS pooling.
* ``distilbert``: DistilBERT weight names and config keys, no token types, max pooling;
  tokenizer_config.json says ``do_lower_case: true`` while tokenizer.json's normalizer does not lowercase
  (transformers follows tokenizer_config.json).
* ``bert-dense``: BERT, mean pooling, a Dense layer (32 -> 16, tanh), Normalize; a cased tokenizer
  with sentence-transformers' ``do_lower_case: true``.

Runs in the peers' venv (``make fixtures``); the only place besides make_reference_embeddings.py that
imports PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_reference_embeddings as ref  # noqa: E402  (the texts of the MiniLM fixture)

HIDDEN = 32
LAYERS = 2
HEADS = 4
INTERMEDIATE = 48  # not a multiple of HIDDEN, so a transposed matrix cannot pass a shape check
MAX_SEQ_LENGTH = 64
VOCAB = 600
SEED = 0
TEXTS_FILE = "family_texts.json"
FAMILIES = ("roberta", "xlm-roberta", "distilbert", "bert-dense")


def build_texts() -> list[str]:
    """~60 deterministic texts: edge cases, special-token look-alikes, unicode, case, long ones."""
    texts = ["", " ", "a", "A", "中", "😀", "é", "\u200b", "[CLS]", "[PAD]", "[UNK]", "<pad>", "<s>",
             "</s> <mask>", "<unk> <pad> x", "hello <pad> world"]
    texts += ref.SHORT_SENTENCES[:12]
    texts += ref.MULTILINGUAL[::5]
    texts += ref.EMOJI_AND_COMBINING[::6]
    texts += ref.CONTROL_CHARACTERS[::4]
    texts += ["ΟΔΟΣ ΣΟΦΟΣ", "İstanbul ISTANBUL ıi", "HeLLo WoRLD, HELLO world", "Ǆemal ǅemal ǆemal"]
    texts += ref.medium_texts()[:3]
    texts += ref.long_texts()[::4]
    return list(dict.fromkeys(texts))


# ------------------------------------------------------------------------------------------ tokenizers


def _train(tokenizer, corpus: Sequence[str], trainer) -> None:
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)


def wordpiece_vocab(corpus: Sequence[str], specials: list[str], lowercase: bool) -> dict[str, int]:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    _train(tok, corpus, trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=specials))
    # The trainer's token order varies between runs (hash order); sorted, the ids are the same every run.
    return {t: i for i, t in enumerate(specials + sorted(set(tok.get_vocab()) - set(specials)))}


def bpe_vocab(corpus: Sequence[str], specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    _train(tok, corpus, trainer)
    state = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return state["vocab"], merges


def unigram_vocab(corpus: Sequence[str], specials: list[str]) -> list[tuple[str, float]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    # Unigram needs every character of the corpus in its vocabulary.
    _train(tok, corpus, trainers.UnigramTrainer(vocab_size=2 * VOCAB, special_tokens=specials, unk_token="<unk>"))
    # Order and the last digits of the scores vary between runs (hash order); sorted, rounded, and the rarest
    # characters (around -11.55) floored, they do not.
    pieces = {p: round(max(score, -11.0), 1) for p, score in json.loads(tok.to_str())["model"]["vocab"] if p not in specials}
    return [(p, 0.0) for p in specials] + sorted(pieces.items())


# ---------------------------------------------------------------------------------------------- models


def randomize(model, seed: int) -> None:
    """Weights far from HF's small init (std 0.02), so every part of the network moves the output."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if p.ndim == 1 and ("LayerNorm" in name or "layer_norm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:  # biases: small, as a bias shared by every token pulls all texts together
                p.copy_(0.05 * noise)
            elif "embeddings" in name:
                p.copy_(noise)
            else:  # Linear [out, in]
                p.copy_(noise * 1.5 / p.shape[1] ** 0.5)


def make_hf(family: str, corpus: Sequence[str], hf_dir: Path) -> None:
    """Saves a random-weight transformers model and its tokenizer to hf_dir."""
    import transformers as tr

    if family in ("distilbert", "bert-dense"):
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        lowercase = family == "distilbert"
        vocab = wordpiece_vocab(corpus, specials, lowercase)
        tok_cls = tr.DistilBertTokenizer if family == "distilbert" else tr.BertTokenizer
        tokenizer = tok_cls(vocab=vocab, do_lower_case=lowercase)
    elif family == "roberta":
        # <pad> first: padding index 0, so positions start at 1 (roberta-base has 1).
        vocab, merges = bpe_vocab(corpus, ["<pad>", "<s>", "</s>", "<unk>", "<mask>"])
        tokenizer = tr.RobertaTokenizer(vocab=vocab, merges=merges)
    else:
        # XLMRobertaTokenizer fixes <s>=0, <pad>=1, </s>=2, <unk>=3.
        tokenizer = tr.XLMRobertaTokenizer(vocab=unigram_vocab(corpus, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]))
    tokenizer.model_max_length = MAX_SEQ_LENGTH
    n_vocab = len(tokenizer)
    pad = tokenizer.pad_token_id
    common = dict(vocab_size=n_vocab, pad_token_id=pad)
    if family == "distilbert":
        config = tr.DistilBertConfig(dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=INTERMEDIATE,
                                     max_position_embeddings=MAX_SEQ_LENGTH, activation="gelu", **common)
        model = tr.DistilBertModel(config)
    else:
        sizes = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=INTERMEDIATE, **common)
        if family == "bert-dense":
            config = tr.BertConfig(max_position_embeddings=MAX_SEQ_LENGTH, **sizes)
            model = tr.BertModel(config)
        else:
            cfg_cls, model_cls = ((tr.RobertaConfig, tr.RobertaModel) if family == "roberta"
                                  else (tr.XLMRobertaConfig, tr.XLMRobertaModel))
            config = cfg_cls(max_position_embeddings=MAX_SEQ_LENGTH + pad + 1, type_vocab_size=1,
                             layer_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, **sizes)
            model = model_cls(config)
    randomize(model, SEED + FAMILIES.index(family))
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)


def make_sentence_transformer(family: str, hf_dir: Path, out: Path) -> None:
    import torch
    from sentence_transformers import SentenceTransformer, models

    transformer = models.Transformer(str(hf_dir), max_seq_length=MAX_SEQ_LENGTH)
    pooling = {"roberta": "mean", "xlm-roberta": "cls", "distilbert": "max", "bert-dense": "mean"}[family]
    modules = [transformer, models.Pooling(HIDDEN, pooling_mode=pooling)]
    if family == "bert-dense":
        dense = models.Dense(HIDDEN, 16, activation_function=torch.nn.Tanh())
        gen = torch.Generator().manual_seed(SEED + 10)
        with torch.no_grad():
            dense.linear.weight.copy_(torch.randn(dense.linear.weight.shape, generator=gen) / HIDDEN ** 0.5)
            dense.linear.bias.copy_(0.05 * torch.randn(dense.linear.bias.shape, generator=gen))
        modules += [dense, models.Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(out))
    (out / "README.md").unlink(missing_ok=True)  # the generated model card: noise in a test fixture


def edit_files(family: str, out: Path) -> None:
    """The settings a model ships with that the tests must see honoured."""
    if family == "bert-dense":
        # sentence-transformers lowercases this model's input although its tokenizer is cased.
        path = out / "sentence_bert_config.json"
        cfg = json.loads(path.read_text())
        cfg.update(max_seq_length=MAX_SEQ_LENGTH, do_lower_case=True)
        path.write_text(json.dumps(cfg, indent=2) + "\n")
    elif family == "distilbert":
        # tokenizer.json does not lowercase, tokenizer_config.json says do_lower_case: transformers lowercases.
        path = out / "tokenizer.json"
        tok = json.loads(path.read_text(encoding="utf-8"))
        if tok["normalizer"]["type"] != "BertNormalizer":
            raise SystemExit(f"{path}: expected a BertNormalizer, got {tok['normalizer']}")
        tok["normalizer"]["lowercase"] = False
        path.write_text(json.dumps(tok, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        if not json.loads((out / "tokenizer_config.json").read_text()).get("do_lower_case"):
            raise SystemExit("tokenizer_config.json should say do_lower_case: true")


def encode(out: Path, texts: Sequence[str]) -> tuple[np.ndarray, list[int]]:
    """Embeddings from the directory as sentence-transformers loads it, and untruncated token counts."""
    model = ref.load_model(out)
    if model.max_seq_length != MAX_SEQ_LENGTH:
        raise SystemExit(f"{out}: max_seq_length {model.max_seq_length}, expected {MAX_SEQ_LENGTH}")
    emb = model.encode(list(texts), batch_size=16, convert_to_numpy=True, show_progress_bar=False)
    lengths = [len(ids) for ids in model.tokenizer(list(texts), truncation=False)["input_ids"]]
    return emb.astype(np.float32, copy=False), lengths


def cosine_matrix(emb: np.ndarray) -> np.ndarray:
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    return unit @ unit.T  # [N, N]


def check(family: str, out: Path, emb: np.ndarray, lengths: Sequence[int]) -> None:
    if not np.all(np.isfinite(emb)):
        raise SystemExit(f"{family}: non-finite embeddings")
    if sum(n > MAX_SEQ_LENGTH for n in lengths) < 5:
        raise SystemExit(f"{family}: fewer than 5 texts are truncated")
    sims = cosine_matrix(emb)
    median = np.median(sims[np.triu_indices(len(emb), 1)])
    if median > 0.97:
        raise SystemExit(f"{family}: median cosine between texts {median:.3f}; the fixture would test little")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    if size > 1_000_000:
        raise SystemExit(f"{family}: checkpoint is {size} bytes; keep it under 1 MB")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("tests/fixtures"),
                        help="where to write the fixtures (default: tests/fixtures)")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated subset of {FAMILIES}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    torch.manual_seed(SEED)
    texts = build_texts()
    corpus = ref.build_texts() + ref.PROSE
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / TEXTS_FILE).write_text(json.dumps(texts, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    for family in args.families.split(","):
        if family not in FAMILIES:
            raise SystemExit(f"unknown family {family!r}; expected some of {FAMILIES}")
        out = args.out_dir / family / "model"
        shutil.rmtree(out, ignore_errors=True)
        with tempfile.TemporaryDirectory() as tmp:
            make_hf(family, corpus, Path(tmp))
            make_sentence_transformer(family, Path(tmp), out)
        edit_files(family, out)
        emb, lengths = encode(out, texts)
        check(family, out, emb, lengths)
        np.save(args.out_dir / family / "reference.npy", emb)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        sims = cosine_matrix(emb)[np.triu_indices(len(emb), 1)]
        print(f"{family}: {len(texts)} texts -> {emb.shape} ({sum(n > MAX_SEQ_LENGTH for n in lengths)} truncated), "
              f"median cosine between texts {np.median(sims):.2f}, checkpoint {size / 1e3:.0f} kB in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
