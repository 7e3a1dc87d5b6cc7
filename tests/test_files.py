"""Reading .safetensors files safely: round trip, every kind of damage, pickles refused, metadata
described. All files are real ones written with safetensors and then edited byte by byte."""
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from netweave.network.files import (PICKLE_SUFFIXES, NetworkFileError, base_architecture,
                                    describe_metadata, open_safetensors)

TENSORS = {
    "lora_unet_x.lora_down.weight": torch.randn(4, 8),
    "lora_unet_x.lora_up.weight": torch.randn(8, 4).half(),
    "lora_unet_x.alpha": torch.tensor(4.0),
    "lora_te_y.hada_w1_a": torch.randn(2, 3, 1, 1).bfloat16(),
    "bundle_emb.tok.string_to_param.*": torch.randint(-128, 127, (5,), dtype=torch.int8),
    "flags": torch.tensor([True, False, True]),
    "empty": torch.zeros(0, 3),
}
METADATA = {
    "ss_network_dim": "16",
    "ss_network_args": json.dumps({"algo": "loha", "conv_dim": "4"}),
    "ss_tag_frequency": json.dumps({"10_pixel": {"pixel art": 3}}),
    "ss_bucket": " [1, 2] ",
    "broken": "{not json",
    "plain": "hello",
}


def save(path, tensors=None, metadata=None):
    save_file(TENSORS if tensors is None else tensors, str(path), metadata=metadata)
    return path


@pytest.fixture
def lora(tmp_path):
    return save(tmp_path / "net.safetensors", metadata=METADATA)


def split(path):
    """(header dict, data bytes) of a saved file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write(path, header, data):
    """A file with this header (dict, list or raw bytes) and data, its length field correct."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def edit(path, change):
    """Rewrite a saved file's header through `change(header)`, keeping its data."""
    header, data = split(path)
    change(header)
    return write(path, header, data)


def refused(path, *words):
    with pytest.raises(NetworkFileError) as info:
        open_safetensors(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and info.value.path == str(path)
    for word in words:
        assert word in message, message
    return message


# ---- round trip --------------------------------------------------------------------------


def test_round_trip(lora):
    with open_safetensors(lora) as f:
        assert f.keys() == sorted(TENSORS)
        for key, tensor in TENSORS.items():
            assert f.shape(key) == tuple(tensor.shape)
            assert f.dtype(key) == tensor.dtype
            assert f.nbytes(key) == tensor.numel() * tensor.element_size()
            got = f.get(key)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor)
        assert f.nbytes() == len(split(lora)[1])
        assert (f.size, f.mtime_ns) == (os.stat(lora).st_size, os.stat(lora).st_mtime_ns)
        assert f.path == str(lora)


def test_metadata_json_strings_are_parsed_as_a1111_does(lora):
    with open_safetensors(lora) as f:
        assert f.metadata == {
            "ss_network_dim": "16",
            "ss_network_args": {"algo": "loha", "conv_dim": "4"},
            "ss_tag_frequency": {"10_pixel": {"pixel art": 3}},
            "ss_bucket": [1, 2],
            "broken": "{not json",
            "plain": "hello",
        }


def test_fp8_and_no_tensors_and_no_metadata(tmp_path):
    fp8 = {"a": torch.randn(6).to(torch.float8_e4m3fn), "b": torch.randn(2, 2).to(torch.float8_e5m2)}
    with open_safetensors(save(tmp_path / "f8.safetensors", fp8)) as f:
        assert all(torch.equal(f.get(k).view(torch.uint8), v.view(torch.uint8)) for k, v in fp8.items())
        assert f.metadata == {}
    with open_safetensors(save(tmp_path / "none.safetensors", {})) as f:
        assert f.keys() == [] and f.nbytes() == 0


def test_header_checks_need_no_tensor_read(lora):
    # Shapes, dtypes and sizes come from the header: they still answer after the data is gone
    # (get() then refuses instead of reading a file that changed under its memory map).
    f = open_safetensors(lora)
    lora.write_bytes(b"")
    assert f.shape("lora_unet_x.lora_down.weight") == (4, 8)
    assert f.dtype("lora_unet_x.lora_up.weight") == torch.float16
    with pytest.raises(NetworkFileError, match="changed on disk"):
        f.get("lora_unet_x.alpha")
    f.close()


def test_tensor_outlives_its_file_being_overwritten_in_place(tmp_path):
    # In a child process: a tensor still backed by the memory map would die of SIGBUS here.
    path = save(tmp_path / "big.safetensors", {"w": torch.ones(1 << 20)})
    code = (
        "import sys; from netweave.network.files import open_safetensors\n"
        "with open_safetensors(sys.argv[1]) as f:\n"
        "    w = f.get('w')\n"
        "open(sys.argv[1], 'wb').close()\n"
        "assert float(w.sum()) == float(1 << 20)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_unknown_key_and_closed_file(lora):
    f = open_safetensors(Path(lora))
    with pytest.raises(KeyError, match="nope"):
        f.get("nope")
    f.close()
    with pytest.raises(NetworkFileError, match="closed"):
        f.get("flags")


def test_bool_bytes_other_than_0_and_1_are_bad_bytes(tmp_path):
    path = save(tmp_path / "b.safetensors", {"mask": torch.tensor([True, False])})
    raw = bytearray(path.read_bytes())
    raw[-1] = 7
    path.write_bytes(bytes(raw))
    with open_safetensors(path) as f, pytest.raises(NetworkFileError) as info:
        f.get("mask")
    assert str(path) in str(info.value) and "'mask'" in str(info.value)


# ---- damaged files -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["8", "header/2", "header-1", "data/2", "end-1"])
def test_truncated_files(lora, where):
    n = struct.unpack("<Q", lora.read_bytes()[:8])[0]
    size = lora.stat().st_size
    cut = {"8": 8, "header/2": 8 + n // 2, "header-1": 8 + n - 1,
           "data/2": 8 + n + (size - 8 - n) // 2, "end-1": size - 1}[where]
    lora.write_bytes(lora.read_bytes()[:cut])
    refused(lora, "truncated")


def test_empty_and_too_short(tmp_path):
    refused(write_raw(tmp_path / "e.safetensors", b""), "empty")
    refused(write_raw(tmp_path / "s.safetensors", b"\x10\x00\x00"), "too short")


def write_raw(path, data):
    path.write_bytes(data)
    return path


def test_header_length_beyond_file_and_absurd(lora):
    raw = lora.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    lora.write_bytes(struct.pack("<Q", n + 10_000) + raw[8:])
    refused(lora, "claims to be", "truncated")
    lora.write_bytes(struct.pack("<Q", 2**40) + raw[8:])
    refused(lora, "limit")


@pytest.mark.parametrize("old,new,words", [
    (b"{", b"\xff", ["UTF-8"]),
    (b":", b"!", ["not valid JSON"]),
    (b'"dtype"', b'"dtypo"', ["has no dtype"]),
    (b'"F16"', b'"F17"', ["'F17'", "cannot read"]),
    (b'"shape"', b'"shaqe"', ["has no shape"]),
    (b"data_offsets", b"data_offzets", ["has no data_offsets"]),
])
def test_flipped_header_bytes(lora, old, new, words):
    raw = lora.read_bytes()
    assert old in raw[8:]
    lora.write_bytes(raw.replace(old, new, 1))
    refused(lora, *words)


def test_header_that_is_not_json_or_not_an_object(lora):
    _, data = split(lora)
    refused(write(lora, b"hello world", data), "not valid JSON")
    refused(write(lora, [1, 2, 3], data), "JSON list, not an object")
    refused(write(lora, b'"text"', data), "JSON string")
    refused(write(lora, b"[" * 5000 + b"]" * 5000, data), "not valid JSON")


@pytest.mark.parametrize("field", ["dtype", "shape", "data_offsets"])
def test_entry_missing_a_field_names_the_key(lora, field):
    edit(lora, lambda h: h["flags"].pop(field))
    refused(lora, "'flags'", f"has no {field}")


def test_entry_that_is_not_an_object(lora):
    edit(lora, lambda h: h.__setitem__("flags", [1, 2]))
    refused(lora, "'flags'", "not described")


def test_unsupported_dtype(tmp_path):
    path = save(tmp_path / "u.safetensors", {"a": torch.zeros(2, dtype=torch.uint16)})
    refused(path, "'a'", "'U16'", "F32")


@pytest.mark.parametrize("change,words", [
    (lambda e: e.__setitem__("shape", [8, 5]), ["should take 80 bytes", "span 64 bytes"]),
    (lambda e: e.__setitem__("shape", [-4, 8]), ["non-negative whole numbers"]),
    (lambda e: e.__setitem__("shape", [4.0, 8]), ["non-negative whole numbers"]),
    (lambda e: e.__setitem__("shape", [2**64, 8]), ["non-negative whole numbers"]),
    (lambda e: e.__setitem__("shape", [2**63] * 50_000), ["far more data"]),
    (lambda e: e.__setitem__("data_offsets", [0]), ["not a pair"]),
    (lambda e: e.__setitem__("data_offsets", "0-64"), ["not a pair"]),
    (lambda e: e.__setitem__("data_offsets", e["data_offsets"][::-1]), ["end before they start"]),
    (lambda e: e.__setitem__("dtype", ["F16"]), ["cannot read"]),
])
def test_offsets_and_shape_must_agree(lora, change, words):
    key = "lora_unet_x.lora_up.weight"  # [8, 4] F16: 64 bytes
    edit(lora, lambda h: change(h[key]))
    message = refused(lora, repr(key), *words)
    assert len(message) < 1000  # values from the file are quoted briefly


def test_overlapping_offsets(lora):
    header, _ = split(lora)
    a, b = "lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight"
    edit(lora, lambda h: h[b].update(dtype="F32", shape=[4, 8], data_offsets=header[a]["data_offsets"]))
    refused(lora, "overlap", repr(a), repr(b))


def test_gap_and_trailing_bytes(tmp_path):
    path = save(tmp_path / "g.safetensors", {"a": torch.ones(2), "b": torch.ones(3)})
    header, data = split(path)
    header["b"]["data_offsets"] = [o + 4 for o in header["b"]["data_offsets"]]
    refused(write(path, header, data[:8] + b"\0" * 4 + data[8:]), "4 unused bytes before tensor 'b'")
    save(path, {"a": torch.ones(2)})
    path.write_bytes(path.read_bytes() + b"junk")
    refused(path, "4 bytes after the last tensor")


def test_metadata_must_be_text(lora):
    edit(lora, lambda h: h["__metadata__"].__setitem__("ss_network_dim", 16))
    refused(lora, "__metadata__")
    edit(lora, lambda h: h.__setitem__("__metadata__", ["a"]))
    refused(lora, "__metadata__")


def test_duplicate_keys(tmp_path):
    path = save(tmp_path / "d.safetensors", {"a": torch.ones(1)})
    header, data = split(path)
    blob = json.dumps(header).encode()
    blob = blob[:-1] + b', "a": ' + json.dumps(header["a"]).encode() + b"}"
    refused(write(path, blob, data), "'a' twice")


def test_missing_folder_fifo_and_unreadable(tmp_path):
    refused(tmp_path / "nope.safetensors", "does not exist")
    refused(tmp_path, "folder")
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    refused(fifo, "not a regular file")  # and does not block waiting for a writer


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_permission_denied(lora):
    lora.chmod(0)
    try:
        refused(lora, "cannot be read", "ermission")
    finally:
        lora.chmod(0o644)


# ---- pickles -----------------------------------------------------------------------------

UNPICKLED = []


def _record(what):
    UNPICKLED.append(what)
    return what


class Trap:
    """Unpickling this calls _record: proof that a file was (or was not) unpickled."""

    def __reduce__(self):
        return _record, ("unpickled",)


def torch_save(path, **kw):
    torch.save({"w": torch.zeros(2), "trap": Trap()}, path, **kw)
    assert b"_record" in path.read_bytes()  # the trap is really in the file
    return path


def assert_conversion_advice(message, path):
    assert "pickle" in message and "weights_only=True" in message and "save_file" in message
    assert repr(str(path)) in message  # the snippet names the user's own file


@pytest.mark.parametrize("suffix", PICKLE_SUFFIXES + (".CKPT",))
def test_pickle_refused_by_suffix(tmp_path, suffix):
    path = torch_save(tmp_path / f"model{suffix}")
    assert_conversion_advice(refused(path), path)
    assert UNPICKLED == []


@pytest.mark.parametrize("kw", [{}, {"_use_new_zipfile_serialization": False},
                                {"_use_new_zipfile_serialization": False, "pickle_protocol": 4}],
                         ids=["zip", "legacy-protocol-2", "legacy-protocol-4"])
def test_pickle_refused_by_content_whatever_the_name(tmp_path, kw):
    for name in ("renamed.safetensors", "no_suffix"):
        path = torch_save(tmp_path / name, **kw)
        assert_conversion_advice(refused(path), path)
    assert UNPICKLED == []


def test_a_real_header_of_640_bytes_is_not_mistaken_for_a_pickle(tmp_path):
    # 640 = 0x280 is written b"\x80\x02\0\0...", the same first two bytes as a protocol-2 pickle.
    path = save(tmp_path / "h.safetensors", {"a": torch.ones(2)})
    header, data = split(path)
    blob = json.dumps(header).encode()
    blob += b" " * (640 - len(blob))
    write(path, blob, data)
    assert path.read_bytes()[:2] == b"\x80\x02"
    with open_safetensors(path) as f:
        assert torch.equal(f.get("a"), torch.ones(2))


# ---- random damage -------------------------------------------------------------------------

SMALL = {"w": torch.arange(6, dtype=torch.float16).reshape(2, 3), "m": torch.tensor([True, False]),
         "alpha": torch.tensor(2.0)}


@pytest.fixture(scope="module")
def small_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "small.safetensors"
    return save(path, SMALL, {"ss_network_dim": "4", "ss_tag_frequency": '{"a": {"b": 1}}'}).read_bytes()


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_damage_raises_only_network_file_error(small_bytes, data):
    raw = bytearray(small_bytes)
    for _ in range(data.draw(st.integers(1, 6), "mutations")):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans(), "resize"):
        cut = data.draw(st.integers(0, len(raw) + 16), "new length")
        raw = raw[:cut] + bytes(max(0, cut - len(raw)))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.safetensors")
        with open(path, "wb") as f:
            f.write(raw)
        try:
            with open_safetensors(path) as sf:
                for key in sf.keys():
                    assert sf.get(key).shape == sf.shape(key)
        except NetworkFileError as e:
            assert str(e).startswith(path)


# ---- metadata described ----------------------------------------------------------------------

KOHYA_SD1 = {
    "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors",
    "ss_v2": "False",
    "ss_network_module": "networks.lora",
    "ss_network_dim": "32",
    "ss_network_alpha": "16.0",
    "ss_output_name": "pixel_art",
    "ss_resolution": "(512, 768)",
    "ss_tag_frequency": json.dumps({
        "10_pixel": {"pixel art": 10, " 1girl": 7, "solo": 7, "sky": 2},
        "5_background": {"sky": 6, "pixel art": 1},
    }),
}
KOHYA_SDXL_LOKR = {
    "ss_base_model_version": "sdxl_base_v1-0",
    "ss_sd_model_name": "sd_xl_base_1.0.safetensors",
    "ss_v2": "False",
    "ss_network_module": "lycoris.kohya",
    "ss_network_args": json.dumps({"algo": "lokr", "factor": "8", "conv_dim": "100000"}),
    "ss_network_dim": "100000",
    "ss_network_alpha": "1",
    "ss_resolution": "(1024, 1024)",
}
MODELSPEC = {
    "modelspec.sai_model_spec": "1.0.0",
    "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
    "modelspec.title": "Watercolor",
    "modelspec.trigger_phrase": "wtrcolor, painting",
    "modelspec.resolution": "1024x1024",
}


def test_describe_kohya_sd1_through_a_real_file(tmp_path):
    path = save(tmp_path / "pixel.safetensors", {"a": torch.ones(1)}, KOHYA_SD1)
    with open_safetensors(path) as f:
        described = describe_metadata(f.metadata)
    assert described == {
        "trigger_words": ["pixel art", "sky", "1girl", "solo"],  # 11, 8, then the tie by name
        "base_model": "v1-5-pruned-emaonly.safetensors",
        "network_type": "lora",
        "rank": 32,
        "alpha": 16.0,
        "title": "pixel_art",
        "resolution": "512x768",
    }
    assert base_architecture(f.metadata) == "sd1"


def test_describe_kohya_sdxl_lycoris_raw_strings():
    described = describe_metadata(KOHYA_SDXL_LOKR)  # unparsed strings work as well
    assert described["network_type"] == "lokr"
    assert (described["rank"], described["alpha"]) == (100000, 1.0)
    assert described["resolution"] == "1024x1024" and described["trigger_words"] == []
    assert base_architecture(KOHYA_SDXL_LOKR) == "sdxl"


def test_describe_modelspec():
    assert describe_metadata(MODELSPEC) == {
        "trigger_words": ["wtrcolor", "painting"],
        "base_model": "stable-diffusion-xl-v1-base",
        "network_type": "lora",
        "rank": None,
        "alpha": None,
        "title": "Watercolor",
        "resolution": "1024x1024",
    }
    assert base_architecture(MODELSPEC) == "sdxl"


def test_trigger_words_top_20_ties_by_name_phrase_first():
    tags = {f"tag{i:02d}": 100 - i // 2 for i in range(30)}
    meta = {"ss_tag_frequency": {"d1": tags, "d2": {"tag29": 1000, "  ": 5, "bad": "x"}},
            "modelspec.trigger_phrase": "tag05, zz"}
    words = describe_metadata(meta)["trigger_words"]
    assert words[:3] == ["tag05", "zz", "tag29"]
    assert words[3:] == [f"tag{i:02d}" for i in range(30) if i != 5][:17]
    assert len(words) == 20


def test_describe_nothing_or_junk():
    assert describe_metadata({}) == dict.fromkeys(
        ["base_model", "network_type", "rank", "alpha", "title", "resolution"], None) | {"trigger_words": []}
    junk = {"ss_tag_frequency": "{broken", "ss_network_dim": "None", "ss_network_alpha": "Dynamic",
            "ss_network_args": "[1]", "ss_network_module": "networks.lora", "ss_resolution": ""}
    described = describe_metadata(junk)
    assert described["trigger_words"] == [] and described["rank"] is None and described["alpha"] is None
    assert described["network_type"] == "lora" and described["resolution"] is None


@pytest.mark.parametrize("module,args,expected", [
    ("networks.lora", {}, "lora"),
    ("networks.lora", {"conv_dim": "8", "conv_alpha": "1"}, "locon"),
    ("networks.dylora", {}, "dylora"),
    ("networks.oft", {}, "oft"),
    ("lycoris.kohya", {"algo": "LoHa"}, "loha"),
    ("lycoris.kohya", {}, "lora"),
    ("locon.locon_kohya", {}, "locon"),
])
def test_network_type(module, args, expected):
    meta = {"ss_network_module": module, "ss_network_args": json.dumps(args)}
    assert describe_metadata(meta)["network_type"] == expected


@pytest.mark.parametrize("meta,expected", [
    ({"ss_base_model_version": "sd_v1", "ss_v2": "False"}, "sd1"),
    ({"ss_base_model_version": "sd_2.0", "ss_v2": "True"}, "sd2"),
    ({"ss_base_model_version": "sd_v2"}, "sd2"),
    ({"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}, "sdxl"),
    ({"ss_base_model_version": "sd3", "ss_v2": "False"}, None),  # named, but not ours: no fallback
    ({"ss_base_model_version": "flux1"}, "flux"),
    ({"ss_base_model_version": "chroma"}, "chroma"),
    ({"modelspec.architecture": "flux-1-dev/lora"}, "flux"),
    ({"ss_v2": "True"}, "sd2"),
    ({"ss_v2": "False"}, "sd1"),
    ({"modelspec.architecture": "stable-diffusion-v1/lora"}, "sd1"),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v/lycoris"}, "sd2"),
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
    ({"modelspec.architecture": "stable-diffusion-xl-v1-refiner/lora"}, None),
    ({"modelspec.architecture": "stable-diffusion-v3-medium/lora", "ss_v2": "False"}, None),
    ({"format": "pt"}, None),
    ({}, None),
])
def test_base_architecture(meta, expected):
    assert base_architecture(meta) == expected


def test_what_only_safetensors_rejects_is_still_a_network_file_error(lora):
    # Python's json accepts a lone surrogate escape; safetensors' parser does not.
    edit(lora, lambda h: h["__metadata__"].__setitem__("plain", "\ud800"))
    refused(lora, "not valid Unicode")
