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
      "--output", "o"], "--warmup configures the local engine"),
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


def test_run_against_a_server_that_does_not_serve_the_model_is_one_line(server, tmp_path, capsys):
    from bulkinfer.cli import main

    (tmp_path / "a.jsonl").write_text('{"id": 1, "text": "x"}\n')
    code = main(["run", "--model", "digits", "--server", server.url, "--input", str(tmp_path / "a.jsonl"),
                 "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"{server.url} refuses model 'digits' (HTTP 404" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
