"""The tokenizer a GGUF file describes in its metadata, as a `tokenizers.Tokenizer`.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`), the BPE
merges or SentencePiece scores, each token's type and the special token ids as metadata.  Two kinds:

- `tokenizer.ggml.model == "gpt2"`: byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM, StarCoder ...).  The
  text is split by the regex that `tokenizer.ggml.pre` names (llama.cpp's `llama-vocab.cpp` lists them),
  then each piece is spelled in GPT-2's byte alphabet and merged.
- `tokenizer.ggml.model == "llama"`: SentencePiece BPE (Llama 2, Mistral, TinyLlama ...): "▁" for spaces,
  merges recovered from the token scores (as transformers' GGUF loader does), unknown bytes spelled as
  `<0xNN>` tokens.

Tokens of type CONTROL (3) become special tokens and USER_DEFINED (4) added tokens, so both are matched
whole in text (a chat template's `<|im_start|>`), as llama.cpp does.

    >>> metadata = gguf_file.read_metadata("model.gguf")
    >>> tokenizer = tokenizer_from_metadata(metadata)
    >>> tokenizer.encode("Hello world").ids
"""

from __future__ import annotations

from collections.abc import Mapping

from bulkinfer.models.checkpoint import CheckpointError

# llama.cpp's token types (gguf.TokenType): NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6.
_CONTROL, _USER_DEFINED = 3, 4

# Split regexes of byte-level vocabularies, by `tokenizer.ggml.pre` (llama.cpp src/llama-vocab.cpp, where
# several regexes apply one after the other; tokenizers' Split with behavior="isolated" does the same).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGIT = r"\p{N}"
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("default", "gpt2", "gpt-2", "mpt", "olmo", "jais"), (_GPT2,)),
    # digits one by one, then GPT-2's regex
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"), (_DIGIT, _GPT2)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"), (_LLAMA3,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), (_QWEN2,)),
}


def _field(metadata: Mapping, key: str, default=None):
    return metadata[key] if key in metadata else default


def tokenizer_from_metadata(metadata: Mapping):
    """A `tokenizers.Tokenizer` from a GGUF's metadata (`gguf_file.read_metadata`): keys
    tokenizer.ggml.{model, pre, tokens, merges | scores, token_type, add_bos_token, add_eos_token,
    add_space_prefix, bos_token_id, eos_token_id, unknown_token_id}.

    `encode(text)` adds BOS (EOS) when the file says add_bos_token (add_eos_token).  Raises CheckpointError
    for a tokenizer kind or pre-tokenizer this module does not know, naming the value and the known ones.
    """
    kind = _field(metadata, "tokenizer.ggml.model")
    tokens = _field(metadata, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise CheckpointError("the GGUF file has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens "
                              "are missing); convert the model with its tokenizer (llama.cpp convert_hf_to_gguf.py)")
    if kind == "gpt2":
        tokenizer = _byte_level(metadata, tokens)
        add_bos_default = False
    elif kind == "llama":
        tokenizer = _sentencepiece(metadata, tokens)
        add_bos_default = True  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
    else:
        raise CheckpointError(f"GGUF tokenizer.ggml.model {kind!r} is not supported; supported: 'gpt2' "
                              "(byte-level BPE) and 'llama' (SentencePiece BPE)")
    _add_special_tokens(tokenizer, tokens, _field(metadata, "tokenizer.ggml.token_type") or ())
    _set_post_processor(
        tokenizer, tokens,
        bos=_field(metadata, "tokenizer.ggml.bos_token_id") if
        _field(metadata, "tokenizer.ggml.add_bos_token", add_bos_default) else None,
        eos=_field(metadata, "tokenizer.ggml.eos_token_id") if
        _field(metadata, "tokenizer.ggml.add_eos_token", False) else None,
    )
    return tokenizer


def _byte_level(metadata: Mapping, tokens: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = _field(metadata, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise CheckpointError(
            f"GGUF tokenizer.ggml.pre {pre!r} (how text is split before BPE) is not known here; known: "
            f"{', '.join(sorted(PRE_TOKENIZER_SPLITS))}; use the model's HF directory (tokenizer.json) instead")
    merges = _field(metadata, "tokenizer.ggml.merges")
    if merges is None:
        raise CheckpointError("the GGUF's byte-level tokenizer has no tokenizer.ggml.merges")
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    spelling = _bytes_to_unicode()
    # A token outside the byte alphabet (a mislabelled added token) is respelled byte by byte, as
    # transformers' GGUF loader does, so the BPE model can still find it.
    vocab = {}
    for index, token in enumerate(tokens):
        if not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    splits = PRE_TOKENIZER_SPLITS[pre]
    if splits == (_GPT2,):
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (openai/gpt-2 encoder.py `bytes_to_unicode`)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _sentencepiece(metadata: Mapping, tokens: list[str]):
    """SentencePiece BPE: merges recovered from the scores (a merge ranks by the score of the token it
    makes; transformers `generate_merges`, used by its GGUF loader for the same purpose)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    scores = _field(metadata, "tokenizer.ggml.scores")
    if scores is None:
        raise CheckpointError("the GGUF's SentencePiece tokenizer has no tokenizer.ggml.scores")
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    merges = []
    for token, score in zip(tokens, scores):
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    unk_id = _field(metadata, "tokenizer.ggml.unknown_token_id", 0)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges],
                                     unk_token=tokens[unk_id], fuse_unk=True, byte_fallback=True))
    prefix = _field(metadata, "tokenizer.ggml.add_space_prefix", True)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                       split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _add_special_tokens(tokenizer, tokens: list[str], token_types) -> None:
    from tokenizers import AddedToken

    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, token_types) if k == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, token_types) if k == _USER_DEFINED]
    vocab = tokenizer.get_vocab()
    missing = [t.content for t in control + user if t.content not in vocab]
    if missing:
        raise CheckpointError(f"GGUF tokens {missing[:5]} are marked special but missing from the vocabulary")
    if control:
        tokenizer.add_special_tokens(control)
    if user:
        tokenizer.add_tokens(user)


def _set_post_processor(tokenizer, tokens: list[str], *, bos: int | None, eos: int | None) -> None:
    from tokenizers import processors

    if bos is None and eos is None:
        return
    single, pair, special = "$A", "$A $B", []
    if bos is not None:
        single, pair = f"{tokens[bos]} {single}", f"{tokens[bos]} $A {tokens[bos]} $B"
        special.append((tokens[bos], bos))
    if eos is not None:
        single, pair = f"{single} {tokens[eos]}", f"{pair} {tokens[eos]}"
        special.append((tokens[eos], eos))
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
