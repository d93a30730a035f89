"""The executable cache: a fresh process runs stored executables without tracing, and gets the same
outputs; what decides an executable is in its key; damaged entries and JAX-cache hits are never used."""

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from bulkinfer.runtime import Bucketing, Engine
from bulkinfer.runtime import executables as ex
from bulkinfer.testing import TINY_BERT_INPUTS, random_token_rows, tiny_bert

SCRIPT = Path(__file__).with_name("executables_check.py")


def check(tmp_path, name, *flags) -> dict:
    out = tmp_path / f"{name}.npy"
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the suite's: only with --jax-cache
    done = subprocess.run([sys.executable, str(SCRIPT), str(out), *flags], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "out": np.load(out)}


def test_a_fresh_process_runs_the_stored_executables_untraced(tmp_path):
    store = str(tmp_path / "exe")
    first = check(tmp_path, "first", "--executables", store)
    assert first["hits"] == first["loads"] == 0 and first["misses"] == first["compiles"] > 1
    assert first["traces"] >= first["compiles"]
    assert len(list(Path(store).glob("*.exe"))) == first["compiles"]
    second = check(tmp_path, "second", "--executables", store)
    assert second["traces"] == second["compiles"] == 0 and second["hits"] == second["loads"] == first["compiles"]
    np.testing.assert_array_equal(second["out"], first["out"])
    # Entries are the owner's alone; one that others may write is not loaded (it is compiled instead).
    entries = sorted(Path(store).glob("*.exe"))
    assert all(e.stat().st_mode & 0o077 == 0 for e in entries) and Path(store).stat().st_mode & 0o077 == 0
    entries[0].chmod(0o666)
    third = check(tmp_path, "third", "--executables", store)
    assert (third["hits"], third["misses"], third["traces"]) == (first["compiles"] - 1, 1, 1)
    assert (third["loads"], third["compiles"]) == (first["compiles"] - 1, 1)
    np.testing.assert_array_equal(third["out"], first["out"])


def test_nothing_is_stored_while_jax_cache_is_in_use(tmp_path):
    # An executable JAX's cache served would fail to run in the next process (executables.jax_cache_in_use).
    jax_cache = str(tmp_path / "jax")
    warm = check(tmp_path, "warm", "--jax-cache", jax_cache)
    both = check(tmp_path, "both", "--jax-cache", jax_cache, "--executables", str(tmp_path / "exe"))
    assert both["misses"] == both["compiles"] > 1 and not list((tmp_path / "exe").glob("*.exe"))
    np.testing.assert_array_equal(both["out"], warm["out"])



def test_the_key_holds_what_decides_an_executable(tmp_path, monkeypatch):
    fn, params = tiny_bert()
    engine = Engine(fn, params, inputs=TINY_BERT_INPUTS, bucketing=Bucketing(lengths=(8,), token_budget=32))
    base = dict(params=engine._params, batch_spec=engine.batch_spec(4, 8), mesh=engine._mesh,
                compiler_options={"a": "1"}, environ={})
    cache = ex.ExecutableCache(tmp_path, "code")
    path = cache._path(ex.key_parts(**base))
    assert cache._path(ex.key_parts(**base)) == path  # deterministic
    half = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), engine._params)
    for change in ({"batch_spec": engine.batch_spec(2, 8)}, {"compiler_options": {}},
                   {"environ": {"XLA_FLAGS": "--xla_cpu_use_xnnpack=true"}}, {"params": half}):
        assert cache._path(ex.key_parts(**{**base, **change})) != path, change
    assert ex.ExecutableCache(tmp_path, "other code")._path(ex.key_parts(**base)) != path
    assert jax.__version__ in ex.key_parts(**base)["versions"]
    assert ex.key_parts(**base)["engine"] == ex.source_digest(*ex.ENGINE_MODULES)  # jit and batch layout code
    monkeypatch.setattr(ex, "_host_cpu", lambda: "x86_64\nflags : sse2")  # XLA:CPU compiles for the host's ISA
    assert cache._path(ex.key_parts(**base)) != path


def test_a_damaged_entry_is_ignored_and_compiled_again(tmp_path, caplog):
    fn, params = tiny_bert()
    cache = ex.ExecutableCache(tmp_path, ex.source_digest("bulkinfer.models.bert"))
    rows = random_token_rows(6, max_len=8)
    bucketing = Bucketing(lengths=(8,), token_budget=64, ladder=0)
    want = Engine(fn, params, inputs=TINY_BERT_INPUTS, bucketing=bucketing).run({"input_ids": rows})["output"]
    engine = Engine(fn, params, inputs=TINY_BERT_INPUTS, bucketing=bucketing, executable_cache=cache)
    ((batch, length),) = engine.bucketing.shapes()
    entry = cache._path(engine._key_parts(engine.batch_spec(batch, length)))
    entry.write_bytes(b"not an executable")
    with caplog.at_level(logging.WARNING, logger=ex.__name__):
        got = engine.run({"input_ids": rows})["output"]
    assert "cannot load the cached executable" in caplog.text and str(entry) in caplog.text
    np.testing.assert_array_equal(got, want)
    assert (cache.hits, cache.misses, engine.stats.compiles) == (0, 1, 1)


@pytest.mark.parametrize("directory", [None, "", "gs://bucket/xla"])
def test_urls_and_no_directory_get_no_executable_cache(directory):
    assert ex.ExecutableCache.beside(directory, "code") is None


def test_a_local_directory_gets_one_beside_jax_cache(tmp_path):
    cache = ex.ExecutableCache.beside(str(tmp_path), "code")
    assert cache.directory == tmp_path / ex.SUBDIR and cache.code_key == "code"


def test_the_source_digest_follows_the_modules_source():
    a = ex.source_digest("bulkinfer.models.bert")
    assert a == ex.source_digest("bulkinfer.models.bert") != ex.source_digest("bulkinfer.models.bert",
                                                                               "bulkinfer.models.text")


def test_entries_unused_for_max_age_days_go_at_the_first_store_and_a_load_keeps_its_entry(tmp_path, monkeypatch):
    # This process may have JAX's own cache configured by earlier tests, which blocks every store (see
    # jax_cache_in_use); the entry here is loaded in this process only, where that hazard does not arise.
    monkeypatch.setattr(ex, "jax_cache_in_use", lambda environ=None: False)
    fn, params = tiny_bert()
    cache = ex.ExecutableCache(tmp_path, ex.source_digest("bulkinfer.models.bert"), max_age_days=30)
    engine = Engine(fn, params, inputs=TINY_BERT_INPUTS, bucketing=Bucketing(lengths=(8,), token_budget=64, ladder=0),
                    executable_cache=cache)
    ((batch, length),) = engine.bucketing.shapes()
    spec = engine.batch_spec(batch, length)
    old, recent, left = tmp_path / ("0" * 64 + ".exe"), tmp_path / ("1" * 64 + ".exe"), tmp_path / "x.exe.tmp"
    for path, days in ((old, 31), (recent, 29), (left, 2)):
        path.write_bytes(b"an entry")
        os.utime(path, (time.time() - days * 86400,) * 2)
    engine.warmup()  # compiles the one shape and stores it: the first store sweeps
    entry = cache._path(engine._key_parts(spec))
    assert entry.exists() and recent.exists() and not old.exists() and not left.exists()
    assert cache.evicted == 2
    os.utime(entry, (time.time() - 40 * 86400,) * 2)
    reloaded = ex.ExecutableCache(tmp_path, cache.code_key, max_age_days=30)
    assert reloaded.load(engine._key_parts(spec), list(engine._mesh.devices.flat)) is not None
    assert time.time() - entry.stat().st_mtime < 60  # marked used by the load
