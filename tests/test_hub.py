"""Push/pull round trips through transformers' own Hub code, against the local Hub server of `hub_server.py`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hub_server import LFS_SIZE_THRESHOLD, USER, LocalHub, point_clients_at
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
)
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import close_session, get_session
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import swsc_hf
from swsc_hf import SWSCConfig
from swsc_hf.hub import push_compressed

# huggingface_hub 2.4 PUTs LFS content with httpx2's deprecated `data=<file>`: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


@pytest.fixture
def local_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHub]:
    """A local Hub in a thread, with huggingface_hub and transformers pointed at it for the test."""
    hub = LocalHub(tmp_path / "hub-store").start()
    point_clients_at(monkeypatch, hub.url, tmp_path / "hf-home")
    try:
        yield hub
    finally:
        close_session()  # close pooled keep-alive connections first, so no handler thread outlives the server
        hub.stop()


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    """A 2-layer, hidden-64 Llama; untied embeddings so a 32000-token vocabulary makes a >10 MB checkpoint."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def logits(model: torch.nn.Module, vocab_size: int) -> torch.Tensor:
    ids = torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    return model(ids).logits


def test_dense_push_to_hub_round_trip_with_lfs_and_revisions(local_hub: LocalHub) -> None:
    repo_id = f"{USER}/tiny-llama"
    model = tiny_llama(vocab_size=32000)
    first_logits = logits(model, 32000)

    first = model.push_to_hub(repo_id)

    files = {f.path: f for f in HfApi().list_repo_tree(repo_id, recursive=True)}
    weights = files["model.safetensors"]
    assert weights.size > LFS_SIZE_THRESHOLD and weights.lfs is not None
    assert files["config.json"].lfs is None and "README.md" in files
    assert ("PUT", f"/{repo_id}.git/info/lfs/objects/{weights.lfs.sha256}/{weights.size}") in local_hub.requests
    reloaded = AutoModelForCausalLM.from_pretrained(repo_id)
    assert torch.equal(logits(reloaded, 32000), first_logits)

    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    second = model.push_to_hub(repo_id, commit_message="Scale the final norm")
    second_logits = logits(model, 32000)

    assert second.oid != first.oid
    assert HfApi().model_info(repo_id).sha == second.oid
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(repo_id), 32000), second_logits)
    old = AutoModelForCausalLM.from_pretrained(repo_id, revision=first.oid)
    assert torch.equal(logits(old, 32000), first_logits)


def test_local_hub_commit_semantics_and_errors(local_hub: LocalHub) -> None:
    api = HfApi()
    repo_id = f"{USER}/files"
    url = api.create_repo(repo_id)
    assert api.create_repo(repo_id, exist_ok=True) == url
    big = b"x" * (LFS_SIZE_THRESHOLD + 10)  # text, no LFS pattern: LFS only because of its size
    first = api.create_commit(
        repo_id,
        [CommitOperationAdd("notes.txt", b"hello"), CommitOperationAdd("data/big.txt", big)],
        commit_message="add",
    )

    assert Path(hf_hub_download(repo_id, "notes.txt")).read_bytes() == b"hello"
    big_url = hf_hub_url(repo_id, "data/big.txt")
    meta = get_hf_file_metadata(big_url)
    assert (meta.commit_hash, meta.size) == (first.oid, len(big))
    assert meta.etag == next(api.list_repo_tree(repo_id, "data")).lfs.sha256
    partial = get_session().get(big_url, headers={"Range": "bytes=5-9"})
    assert partial.status_code == 206 and partial.content == big[5:10]
    assert partial.headers["Content-Range"] == f"bytes 5-9/{len(big)}"

    second = api.create_commit(repo_id, [CommitOperationDelete("notes.txt")], commit_message="delete")

    assert second.oid != first.oid
    assert "notes.txt" not in api.list_repo_files(repo_id)
    assert "notes.txt" in api.list_repo_files(repo_id, revision=first.oid)
    assert Path(hf_hub_download(repo_id, "notes.txt", revision=first.oid)).read_bytes() == b"hello"
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "notes.txt", force_download=True)
    with pytest.raises(EntryNotFoundError):
        api.create_commit(repo_id, [CommitOperationDelete("notes.txt")], commit_message="delete again")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "data/big.txt", revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{USER}/no-such-repo")
    with pytest.raises(ValueError, match="Invalid metadata"):
        api.create_commit(repo_id, [CommitOperationAdd("README.md", b"---\ntags: 3\n---\n")], commit_message="bad")


def test_compressed_push_to_hub_round_trip_uploads_the_swsc_card(local_hub: LocalHub, tmp_path: Path) -> None:
    dense_dir = tmp_path / "dense"
    tiny_llama(vocab_size=256).save_pretrained(dense_dir)
    config = SWSCConfig(n_clusters=16, segment_length=1, rank=0)
    model = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=config)
    repo_id = f"{USER}/tiny-llama-swsc"

    model.push_to_hub(repo_id)  # plain transformers API: the quantizer installed the card hook

    reloaded = AutoModelForCausalLM.from_pretrained(repo_id)
    assert torch.equal(logits(reloaded, 256), logits(model, 256))
    card = ModelCard.load(repo_id)
    assert card.data.library_name == "transformers"
    assert {"swsc_hf", "compression"} <= set(card.data.tags)
    bits = swsc_hf.compression_report(model).compressed_bits_per_weight
    assert "method `swsc`" in card.text and f"| {bits:.3f} |" in card.text
    assert "import swsc_hf" in card.text and f'AutoModelForCausalLM.from_pretrained("{repo_id}")' in card.text
    assert "Perplexity was not measured" in card.text


def test_push_compressed_records_metrics_base_model_and_user_tags(local_hub: LocalHub, tmp_path: Path) -> None:
    base_id = f"{USER}/tiny-llama-dense"
    dense = tiny_llama(vocab_size=256)
    dense.push_to_hub(base_id)
    model = AutoModelForCausalLM.from_pretrained(
        base_id, quantization_config=SWSCConfig(n_clusters=16, segment_length=1, rank=0)
    )
    metrics = {"dataset": "wikitext2", "seq_len": 128, "tokens": 4096, "perplexity": 301.5, "dense_perplexity": 256.25}

    push_compressed(model, f"{USER}/tiny-swsc", metrics=metrics, base_model=base_id, tags=["my-tag"])

    card = ModelCard.load(f"{USER}/tiny-swsc")
    assert card.data.base_model == base_id and card.data.base_model_relation == "quantized"
    assert {"swsc_hf", "my-tag"} <= set(card.data.tags)
    assert "| wikitext2 | 128 | 4096 | 301.5000 | 256.2500 |" in card.text
