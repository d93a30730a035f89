"""Write data/digits/test-0000{0,1,2}.jsonl: the 450 held-out rows of scripts/train_digits.py's split.

Each line: {"id": "test-NNN", "pixels": 64 numbers 0-16 (row-major 8x8), "label": the true digit}.
The rows are those of `train_test_split(load_digits(), test_size=0.25, random_state=0, stratify=y)`'s
test part, in its order, 150 per file.  Byte-identical on rerun.

    python scripts/make_digits_data.py
    bulkinfer eval --model digits --input 'data/digits/test-*.jsonl' --output out/eval
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(out: Path = ROOT / "data" / "digits", files: int = 3) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "scripts" / "train_digits.py")
    train_digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_digits)
    _, x_test, _, y_test = train_digits.split()
    out.mkdir(parents=True, exist_ok=True)
    for k, idx in enumerate(np.array_split(np.arange(len(y_test)), files)):
        with open(out / f"test-{k:05d}.jsonl", "w", encoding="utf-8") as f:
            for i in idx.tolist():
                pixels = [int(v) for v in x_test[i].reshape(-1)]
                f.write(json.dumps({"id": f"test-{i:03d}", "pixels": pixels, "label": int(y_test[i])}) + "\n")
    print(f"wrote {len(y_test)} rows in {files} files to {out}")


if __name__ == "__main__":
    main()
