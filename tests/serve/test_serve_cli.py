"""`bulkinfer serve` and `bulkinfer run --server`: argument checks that need no server."""

import pytest

from bulkinfer.cli import main


def test_serve_help_names_the_routes_and_knobs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for needle in ("/v2/models/NAME/infer", "--max-queue-delay-ms", "--max-request-bytes", "--token", "127.0.0.1",
                   "--max-connections", "--body-timeout-s"):
        assert needle in text


@pytest.mark.parametrize("argv, message", [
    (["run", "--model", "minilm", "--server", "http://127.0.0.1:1", "--warmup", "--input", "x.jsonl",
      "--output", "o"], "--warmup configure the local engine"),
    (["run", "--model", "minilm", "--server-token", "t", "--input", "x.jsonl", "--output", "o"],
     "--server-token needs --server"),
    (["run", "--model", "minilm", "--server", "localhost:8000", "--input", "x.jsonl", "--output", "o"],
     "must look like http://host:port"),
    (["serve", "--model", "minilm", "--port", "70000"], "port must be in 0..65535"),
    (["serve", "--model", "minilm", "--max-connections", "0"], "max_connections must be >= 1"),
    (["serve", "--model", "minilm", "--body-timeout-s", "0"], "body_timeout_s must be > 0"),
    (["serve", "--model", "no-such-model-dir"], "neither a built-in name"),
])
def test_bad_arguments_exit_2_with_the_fix(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
