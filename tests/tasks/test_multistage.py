"""The README's pipeline with two inference stages (MiniLM, then a JAX head) and CPU stages between them."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_two_model_pipeline_labels_every_text(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Two models in one pipeline\n", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert code.count("bulkinfer.BulkInference(") == 2 and code.count("beam.ParDo(") >= 2
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "BULKINFER_EXAMPLE_OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for f in tmp_path.glob("part-*.jsonl") for line in f.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["cooking-1", "cooking-2", "sport-1", "sport-2", "weather-1", "weather-2"]
    for r in rows:  # the head, fitted on other texts in the example, puts each text in its topic
        assert r["topic"] == r["id"].split("-")[0], r
        assert 1 / 3 < r["confidence"] <= 1 and r["text"]
