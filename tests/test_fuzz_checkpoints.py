"""Fuzzing the loader with corrupted compressed checkpoints: each case fails fast with a ValueError or OSError that
names the tensor, file or config field, or loads a model identical to the original (a harmless edit).

Cases are generated from fixed seeds: truncations, flipped bits in tensor data and in the header, structured header
edits (shapes, dtypes, offsets, huge declared sizes, duplicate and missing names), tensor edits written back without
checksums (out-of-range codes, NaN/Inf tables, wrong dtypes and shapes, missing and extra tensors), config.json
edits (quantization_config fields and layer layouts of the wrong type or value, model sizes) and sharding faults.
Not fuzzed: quant_method itself (another value means transformers never calls swsc_hf).
"""

from __future__ import annotations

import json
import random
import re
import resource
import shutil
import struct
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from swsc_hf import SWSCConfig

LAYER = "model.layers.0.mlp.up_proj"
BAD_VALUES = ["x", -1, 0, 2.5, 10**12, None, True, [], {}, [1], {"a": 1}]
NAMED = re.compile(r"model\.safetensors|model\.\w|lm_head|swsc_shared_bases|SWSCConfig\.|LayerSpec\.|"
                   r"quantization_config|compressed_layers|shard")


# ---- the original checkpoint -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def original(tiny_dense_dir, tmp_path_factory):
    """A compressed checkpoint (codes that can go out of range, scales, low-rank factors) and its logits."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_dense_dir, dtype=torch.float32,
        quantization_config=SWSCConfig(n_clusters=12, segment_length=1, rank=2, scale_group_size=32, kmeans_iters=3))
    path = tmp_path_factory.mktemp("fuzz") / "original"
    model.save_pretrained(path)
    sharded = path.with_name("sharded")
    model.save_pretrained(sharded, max_shard_size="40KB")
    return path, sharded, logits(AutoModelForCausalLM.from_pretrained(path))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(torch.arange(12)[None] % 128).logits


def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join(header: dict | str, data: bytes) -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


# ---- mutations: each edits the copied checkpoint folder in place -------------------------------------------------
def truncate(rng, folder):
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: rng.randrange(len(data))])


def flip_data_bits(rng, folder):
    """1 to 3 flipped bits in the data of one tensor (any tensor, not just the big embeddings)."""
    file = folder / "model.safetensors"
    data = bytearray(file.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    start, stop = header[rng.choice(sorted(k for k, v in header.items() if k != "__metadata__"
                                           and v["data_offsets"][1] > v["data_offsets"][0]))]["data_offsets"]
    for _ in range(rng.randint(1, 3)):
        data[8 + length + rng.randrange(start, stop)] ^= 1 << rng.randrange(8)
    file.write_bytes(bytes(data))


def flip_header_byte(rng, folder):
    file = folder / "model.safetensors"
    data = bytearray(file.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    position = rng.randrange(8 + length)
    data[position] = rng.choice([rng.randrange(256), ord(rng.choice('{}[]",:0123456789 x'))])
    file.write_bytes(bytes(data))


def _entry_edits(rng, info):
    shape, offsets = info["shape"], info["data_offsets"]
    return [
        ("shape", [*shape[:-1], shape[-1] + rng.choice([-1, 1])] if shape else [1]),
        ("shape", [2**40, 2**40]),
        ("shape", [-1] + shape[1:]),
        ("shape", [1.5] + shape[1:]),
        ("shape", "big"),
        ("dtype", rng.choice(["F64", "I64", "U8", "BOOL", "F8_E4M3", "Q4", "", None, 7])),
        ("data_offsets", [offsets[0] + 8, offsets[1] + 8]),
        ("data_offsets", [offsets[1], offsets[0]]),
        ("data_offsets", [offsets[0], 2**62]),
        ("data_offsets", [-8, offsets[1]]),
        ("data_offsets", [offsets[0]]),
        ("data_offsets", None),
    ]


def edit_header(rng, folder):
    file = folder / "model.safetensors"
    header, data = split(file)
    key = rng.choice([k for k in header if k != "__metadata__"])
    choice = rng.randrange(6)
    if choice == 0:
        field, value = rng.choice(_entry_edits(rng, header[key]))
        header[key][field] = value
    elif choice == 1:
        del header[key][rng.choice(list(header[key]))]
    elif choice == 2:
        header[key] = rng.choice(["x", 3, [], None])
    elif choice == 3:
        header[key.replace("model.", "model.extra.", 1)] = header.pop(key)
    elif choice == 4:
        del header[key]
    else:
        text = json.dumps(header)
        entry = json.dumps({key: header[key]})[1:-1]
        file.write_bytes(join(text[:-1] + ", " + entry + "}", data))  # the same name twice
        return
    file.write_bytes(join(header, data))


def edit_header_length(rng, folder):
    file = folder / "model.safetensors"
    data = bytearray(file.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    data[:8] = struct.pack("<Q", rng.choice([0, 1, length - 1, length + 1, len(data), 2**40, 2**64 - 1]))
    file.write_bytes(bytes(data))


def weird_header(rng, folder):
    file = folder / "model.safetensors"
    _, data = split(file)
    text = rng.choice(["[]", "null", '"x"', "[" * 100_000 + "]" * 100_000, '{"__metadata__": {"a": 1}}',
                       '{"__metadata__": "x"}', "{" + '"k": 1, ' * 10_000 + '"k": 2}', "\xff\xfe"])
    file.write_bytes(join(text, data))


def edit_tensors(rng, folder):
    """Rewrite the file with one tensor edit and no checksums (so the structural checks must catch it)."""
    file = folder / "model.safetensors"
    tensors = load_file(file)
    layer = f"model.layers.{rng.randrange(2)}.{rng.choice(['mlp.up_proj', 'mlp.down_proj', 'self_attn.q_proj'])}"
    table = rng.choice(["codebook", "scales", "lowrank_a", "lowrank_b"])
    choice = rng.randrange(9)
    if choice == 0:
        codes = tensors[f"{layer}.codes"]
        codes[rng.randrange(codes.numel())] |= 0xC0 if rng.random() < 0.5 else 0x0C  # a 4-bit code >= 12
    elif choice == 1:
        values = tensors[f"{layer}.{table}"].view(-1)
        values[rng.randrange(values.numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
    elif choice == 2:
        tensors[f"{layer}.codes"] = tensors[f"{layer}.codes"].to(rng.choice([torch.int8, torch.float16]))
    elif choice == 3:
        tensors[f"{layer}.{table}"] = tensors[f"{layer}.{table}"].to(rng.choice([torch.int32, torch.uint8]))
    elif choice == 4:
        value = tensors[f"{layer}.{table}"]
        tensors[f"{layer}.{table}"] = torch.zeros(value.shape[0] + 1, *value.shape[1:], dtype=value.dtype)
    elif choice == 5:
        del tensors[rng.choice(sorted(tensors))]
    elif choice == 6:
        tensors[f"{layer}.{rng.choice(['weight', 'extra', 'codes2'])}"] = torch.zeros(4)
    elif choice == 7:
        tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int64)
    else:
        tensors[f"{layer}.codes"] = tensors[f"{layer}.codes"][: -rng.randint(1, 3)].clone()
    save_file(tensors, file, metadata={"format": "pt"})


def edit_config(rng, folder):
    file = folder / "config.json"
    config = json.loads(file.read_text())
    quant = config["quantization_config"]
    choice = rng.randrange(5)
    if choice == 0:
        quant[rng.choice(sorted(set(quant) - {"quant_method"}))] = rng.choice(BAD_VALUES)
    elif choice == 1:
        layer = quant["compressed_layers"][rng.choice(sorted(quant["compressed_layers"]))]
        field = rng.choice(["out_features", "in_features", "n_clusters", "segment_length", "cluster_dim", "rank",
                            "scale_group_size", "rows_per_codebook", "shared_basis", "unknown"])
        old = layer.get(field, 1)
        plausible = [old + 1, old - 1, old * 2, 10**9] if isinstance(old, int) else ["input", "q_proj_0_1"]
        layer[field] = rng.choice(plausible + BAD_VALUES)
    elif choice == 2:
        del quant["compressed_layers"][rng.choice(sorted(quant["compressed_layers"]))]
    elif choice == 3:
        quant["compressed_layers"][rng.choice(["model.layers.0.mlp", "model.layers.9.mlp.up_proj", "x"])] = {
            "out_features": 128, "in_features": 64, "rank": 2}
    elif rng.random() < 0.25:  # not 10**9 layers: transformers would build them before any swsc_hf hook runs
        config["num_hidden_layers"] = rng.choice([1, 3, 4])
    else:
        field = rng.choice(["hidden_size", "intermediate_size", "vocab_size", "head_dim", "num_key_value_heads"])
        config[field] = rng.choice([config[field] + 1, config[field] * 2, 10**9])
    file.write_text(json.dumps(config))


def break_shards(rng, folder):
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    choice = rng.randrange(4)
    if choice == 0:
        (folder / rng.choice(shards)).unlink()
    elif choice == 1:
        index["weight_map"][rng.choice(sorted(index["weight_map"]))] = "model-00009-of-00009.safetensors"
    elif choice == 2:
        first, second = folder / shards[0], folder / shards[1]
        moved = load_file(second)
        key = rng.choice(sorted(moved))
        save_file({**load_file(first), key: moved[key]}, first, metadata={"format": "pt"})  # stored twice
    else:
        del index["weight_map"][rng.choice(sorted(index["weight_map"]))]
        (folder / shards[0]).write_bytes((folder / shards[0]).read_bytes()[:-5])
    index_file.write_text(json.dumps(index))


# ---- round two (issue 16): what an independent attack found beyond the classes above ----------------------------
def add_alias(rng, folder):
    """A second name for one model tensor (with or without the `model.` prefix), written without checksums."""
    file = folder / "model.safetensors"
    tensors = load_file(file)
    key = rng.choice(sorted(k for k in tensors if k.startswith("model.")))
    alias = "model." + key if rng.random() < 0.5 else key[len("model."):]
    tensors[alias] = tensors[key].clone() if rng.random() < 0.5 else torch.zeros_like(tensors[key])
    save_file(tensors, file, metadata={"format": "pt"})


def edit_meaning(rng, folder):
    """Edits that keep every byte (so the checksums pass) but change what the bytes mean: a header dtype of the
    same width, or a config layout that implies the same tensor shapes."""
    if rng.random() < 0.5:
        file = folder / "model.safetensors"
        header, data = split(file)
        swaps = {"F16": "BF16", "BF16": "F16", "U8": "I8", "F32": "I32"}
        key = rng.choice(sorted(k for k, v in header.items() if k != "__metadata__" and v["dtype"] in swaps))
        header[key]["dtype"] = swaps[header[key]["dtype"]]
        file.write_bytes(join(header, data))
        return
    file = folder / "config.json"
    config = json.loads(file.read_text())
    layers = config["quantization_config"]["compressed_layers"]
    square = sorted(n for n, v in layers.items() if v["out_features"] == v["in_features"])
    if rng.random() < 0.5:
        layer = layers[rng.choice(square)]
        layer["cluster_dim"] = "input" if layer.get("cluster_dim", "output") == "output" else "output"
    else:  # two same-shaped layers' layouts swapped, with a changed field so the swap is not a no-op
        first, second = rng.sample(square, 2)
        layers[first], layers[second] = layers[second], {**layers[first], "cluster_dim": "input"}
    file.write_text(json.dumps(config))


def poison_values(rng, folder):
    """NaN or Inf in any float tensor, compressed table or not (embeddings, norms, head), without checksums."""
    file = folder / "model.safetensors"
    tensors = load_file(file)
    key = rng.choice(sorted(k for k, v in tensors.items() if v.is_floating_point() and v.numel()))
    tensors[key].view(-1)[rng.randrange(tensors[key].numel())] = rng.choice([float("nan"), float("inf"),
                                                                             -float("inf")])
    save_file(tensors, file, metadata={"format": "pt"})


def parser_quirks(rng, folder):
    """Headers Python's json accepts but safetensors' parser refuses: -0, lone surrogates, odd metadata values."""
    file = folder / "model.safetensors"
    header, data = split(file)
    text = json.dumps(header, separators=(",", ":"))
    choice = rng.randrange(4)
    if choice == 0:
        text = text.replace('"data_offsets":[0,', '"data_offsets":[-0,', 1)
    elif choice == 1:
        text = text[:-1] + ',"\\ud800":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'
    elif choice == 2:
        text = json.dumps({**header, "__metadata__": rng.choice([False, 0, [], "x", {"a": None}])})
    else:
        text = text.replace('"shape":[', '"shape":[1e0,', 1)
    raw = text.encode("utf-8", "surrogatepass")
    file.write_bytes(struct.pack("<Q", len(raw) + (-len(raw) % 8)) + raw + b" " * (-len(raw) % 8) + data)


def break_index(rng, folder):
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    weight_map = index["weight_map"]
    key = rng.choice(sorted(weight_map))
    edits = [
        lambda: "{" + json.dumps(index)[1:-2],
        lambda: json.dumps({"metadata": index.get("metadata", {})}),
        lambda: json.dumps({**index, "weight_map": list(weight_map)}),
        lambda: json.dumps({**index, "weight_map": {**weight_map, key: rng.choice([3, None, [], {}])}}),
        lambda: json.dumps({**index, "weight_map": {**weight_map, key: "../" + weight_map[key]}}),
        lambda: json.dumps([index]),
    ]
    index_file.write_text(rng.choice(edits)())


def bad_config_values(rng, folder):
    """quantization_config values that used to pass validation and fail deep inside."""
    file = folder / "config.json"
    config = json.loads(file.read_text())
    quant = config["quantization_config"]
    field, value = rng.choice([("n_clusters", float("nan")), ("n_clusters", float("inf")), ("rank", True),
                               ("segment_length", True), ("scale_group_size", False), ("seed", 2**70),
                               ("seed", -1), ("preset", ["swsc-4bit"]), ("n_samples", 10**12),
                               ("kmeans_iters", 10**9), ("share_group_size", True), ("seq_len", 10**9)])
    quant[field] = value
    file.write_text(json.dumps(config))


FAMILIES = {  # mutation -> (cases, uses the sharded checkpoint)
    truncate: (30, False),
    flip_data_bits: (60, False),
    flip_header_byte: (40, False),
    edit_header: (50, False),
    edit_header_length: (10, False),
    weird_header: (10, False),
    edit_tensors: (45, False),
    edit_config: (50, False),
    break_shards: (10, True),
    add_alias: (10, False),
    edit_meaning: (20, False),
    poison_values: (20, False),
    parser_quirks: (12, False),
    break_index: (12, True),
    bad_config_values: (16, False),
}


def run_case(mutation, seed, source, folder, reference) -> tuple[str, str]:
    shutil.copytree(source, folder)
    mutation(random.Random(seed), folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder)
    except StrictDataclassError as err:  # transformers' own validation of the model's config
        return "clean", f"{type(err).__name__}: {err}"
    except (ValueError, OSError) as err:
        return ("clean" if NAMED.search(str(err)) else "unnamed"), f"{type(err).__name__}: {err}"
    except Exception as err:  # noqa: BLE001 - any other exception is a finding
        return "unclean", f"{type(err).__name__}: {err}"
    return ("harmless" if torch.equal(logits(model), reference) else "silent"), "loaded"


def test_corrupted_checkpoints_fail_cleanly(original, tmp_path):
    path, sharded, reference = original
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    outcomes, findings, slowest = Counter(), [], 0.0
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        for mutation, (count, uses_shards) in FAMILIES.items():
            for seed in range(count):
                start = time.perf_counter()
                outcome, detail = run_case(mutation, seed, sharded if uses_shards else path,
                                           tmp_path / f"{mutation.__name__}-{seed}", reference)
                slowest = max(slowest, time.perf_counter() - start)
                outcomes[outcome] += 1
                if outcome not in ("clean", "harmless"):
                    findings.append(f"{mutation.__name__}[{seed}] {outcome}: {detail[:300]}")
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    print(f"\nfuzz: {sum(outcomes.values())} cases, {dict(outcomes)}, slowest {slowest:.2f} s, "
          f"peak RSS growth {growth_mib:.0f} MiB")
    assert not findings, "\n".join(findings)
    assert outcomes["clean"] > 0.8 * sum(outcomes.values())
    assert growth_mib < 256  # no case allocated what a header or config declared


def test_pickle_is_never_loaded(original, tmp_path):
    path, _, _ = original
    with pytest.raises(ValueError, match="never need unpickling"):
        AutoModelForCausalLM.from_pretrained(path, weights_only=False)
    folder = tmp_path / "bin"
    shutil.copytree(path, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="safetensors only"):
        AutoModelForCausalLM.from_pretrained(folder)
