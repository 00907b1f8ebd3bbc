"""shard.gguf_file reads what the gguf package's GGUFReader reads: every metadata value and
every tensor's type, shape and bytes, for files the gguf package writes."""

from __future__ import annotations

import numpy as np
import pytest

from shard.gguf_file import GgufFile


def _write(path, endian: str = "little"):
    import gguf

    order = gguf.GGUFEndian.LITTLE if endian == "little" else gguf.GGUFEndian.BIG
    writer = gguf.GGUFWriter(str(path), "llama", endianess=order)
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 1.5)
    writer.add_uint64("t.u64", 2**40)
    writer.add_int64("t.i64", -(2**40))
    writer.add_float64("t.f64", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo ▁Ġ")
    writer.add_array("t.strings", ["a", "", "ünï", "Ġthe"])
    writer.add_array("t.ints", [3, -1, 7])
    writer.add_array("t.floats", [0.5, -2.25])
    writer.add_array("t.empty", [])
    rng = np.random.default_rng(0)
    writer.add_tensor("a.f32", rng.standard_normal((3, 5)).astype(np.float32))
    writer.add_tensor("b.f16", rng.standard_normal((2, 4, 8)).astype(np.float16))
    block = rng.integers(0, 256, (4, 2 * 34), dtype=np.uint8)  # 4 rows of 64 Q8_0 inputs
    writer.add_tensor("c.q8", block, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("d.f32", np.arange(7, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("endian", ["little", "big"])
def test_every_value_and_tensor_matches_gguf_reader(tmp_path, endian):
    import gguf

    path = _write(tmp_path / "t.gguf", endian)
    ours, theirs = GgufFile(path), gguf.GGUFReader(str(path))
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
    assert sorted(ours.fields) == sorted(keys)
    for key in keys:
        want, got = theirs.fields[key].contents(), ours.value(key)
        got = got.tolist() if isinstance(got, np.ndarray) else got
        assert got == pytest.approx(want) if isinstance(want, float) else got == want, key
    assert ours.value("t.f32") == 1.5 and ours.value("t.strings")[3] == "Ġthe"
    assert ours.value("absent") is None
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, other in zip(ours.tensors, theirs.tensors, strict=True):
        assert mine.tensor_type == other.tensor_type, mine.name
        assert mine.shape == tuple(int(d) for d in other.shape), mine.name
        assert mine.data.shape == other.data.shape and mine.data.dtype == other.data.dtype
        assert np.array_equal(mine.data, other.data), mine.name
    assert ours.tensors[2].data.shape == (4, 68)  # block kinds: bytes per row


def test_files_that_are_not_gguf_or_are_cut_short_are_refused(tmp_path):
    from shard.errors import ModelLoadError
    from shard.gguf import GgufStore

    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(ValueError, match="not a GGUF file"):
        GgufFile(tmp_path / "x.gguf")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        GgufStore(tmp_path / "x.gguf")
    whole = _write(tmp_path / "t.gguf").read_bytes()
    (tmp_path / "counts.gguf").write_bytes(whole[:12])  # inside the counts
    with pytest.raises(ValueError, match="cut short"):
        GgufFile(tmp_path / "counts.gguf")
    (tmp_path / "header.gguf").write_bytes(whole[:200])  # inside the metadata
    with pytest.raises(ValueError, match="cut short"):
        GgufFile(tmp_path / "header.gguf")
    (tmp_path / "data.gguf").write_bytes(whole[:-8])  # the last tensor's bytes short
    with pytest.raises(ValueError, match="d.f32 runs past the end"):
        GgufFile(tmp_path / "data.gguf")
