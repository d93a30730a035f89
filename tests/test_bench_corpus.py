"""The real-text corpus builder of `make bench` (bench/corpus.py): prose kept, markup dropped."""

from bench.corpus import prose

README = """# Title

[![badge](https://img.shields.io/x.svg)](https://example.org)

A library that makes [HTTP requests](https://example.org/docs) simple for everyone, see `get()`.

```python
import requests  # this is code, not prose
```

Installation
============

    pip install something and more words here.

| a table | with cells | that is long enough |

- A bullet point written as a full English sentence.

Too short.
"""


def test_prose_keeps_sentences_and_drops_markup():
    assert list(prose(README)) == [
        "A library that makes HTTP requests simple for everyone, see get().",
        "A bullet point written as a full English sentence.",
    ]
