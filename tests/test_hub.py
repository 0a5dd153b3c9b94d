"""The export's model card, the Hub upload (huggingface_hub's API mocked: nothing leaves this machine), and an
export that never destroys anything: all or nothing, only an earlier export replaced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import LocalTokenNotFoundError

import dist_gpt.hub
from dist_gpt.checkpoint import save_weights
from dist_gpt.config import Config, GPTConfig, save_config
from dist_gpt.errors import UserError
from dist_gpt.hf import EXPORT_MARKER, export_hf, main
from dist_gpt.hub import model_card, push_to_hub
from dist_gpt.model import GPT
from dist_gpt.rundir import load_run
from dist_gpt.tokenizers import train_tokenizer

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
FINGERPRINT = "ab" * 32


def make_run(run_dir: Path, records: bool = True) -> Path:
    """A run directory as pretrain leaves it; with `records`, the summary, metrics, samples and prepared meta.json too."""
    tok = train_tokenizer("char", [TEXT + "`|"], 0)
    cfg = Config()
    cfg.data.name, cfg.data.source, cfg.data.dir = "tiny", "/corpora/tiny | text.txt", str(run_dir.parent / "data")
    cfg.model = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    cfg.train.max_steps, cfg.train.lr = 20, 2e-3
    torch.manual_seed(0)
    save_config(cfg, run_dir / "config.yaml")
    tok.save(run_dir / "tokenizer.json")
    save_weights(GPT(cfg.model).state_dict(), run_dir / "model.safetensors")
    if records:
        (run_dir / "summary.json").write_text(
            json.dumps(
                {
                    "steps": 20,
                    "tokens_seen": 5120,
                    "final_val_loss": 2.5,
                    "best_val_loss": 2.25,
                    "wall_s": 1.5,
                    "world_size": 1,
                }
            )
        )
        rows = [{"step": s, "tokens": 256 * s, "train_loss": 3.0 - s / 20} for s in range(1, 21)] + [
            {"step": 20, "tokens": 5120, "val_loss": 2.5}
        ]
        # a torn last line
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 21, "tok')
        samples = [
            {"step": 10, "prompt": "\n", "text": "old sample"},
            {"step": 20, "prompt": "ROMEO:", "text": " soft ```light``` | breaks"},
        ]
        (run_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
        (run_dir.parent / "data").mkdir(exist_ok=True)
        (run_dir.parent / "data" / "meta.json").write_text(
            json.dumps({"fingerprint": FINGERPRINT, "tokens": {"train": 900, "val": 100}})
        )
    return run_dir


def test_model_card_says_what_the_run_recorded(tmp_path):
    run = make_run(tmp_path / "tiny_run")
    out = export_hf(run, tmp_path / "hf", log=lambda _m: None)
    card = (out / "README.md").read_text()
    n_params = sum(p.numel() for p in load_run(run).model.parameters())
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    for part in [
        "# tiny_run",
        f"| parameters | {n_params:,} |",
        "| layers x heads x width | 2 x 2 x 16 |",
        "| context (block_size) | 16 tokens |",
        f"`char`, {load_run(run).tokenizer.vocab_size} tokens",
        "| name | tiny |",
        "| source | /corpora/tiny \\| text.txt |",  # a | would end the table cell
        f"| fingerprint of the prepared data | {FINGERPRINT} |",
        "| tokens (train / val) | 900 / 100 |",
        "| optimizer steps | 20 of max_steps 20 |",
        "lr 0.002 -> 0.0001",
        "validation 2.5000 (best 2.2500); last logged training batch 2.0000",
        "![train and validation loss](loss.png)",
        "At step 20, from the prompt 'ROMEO:':\n\n````text\nROMEO: soft ```light``` | breaks\n````",  # a fence the sample cannot close
    ]:
        assert part in card, part
    assert "old sample" not in card
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_model_card_of_a_bare_run_guesses_nothing(tmp_path):
    run = load_run(make_run(tmp_path / "bare", records=False))
    card = model_card(run, 1234)
    assert "| fingerprint of the prepared data | not recorded |" in card
    assert "validation not recorded (best not recorded); last logged training batch not recorded" in card
    assert "not recorded (the run has no samples.jsonl)" in card and "loss.png" not in card


# ----------------------------------------------------------------------------- the upload


class FakeApi:
    """Stands in for huggingface_hub.HfApi: records what would be created and uploaded."""

    calls: list[tuple[str, dict]] = []
    fail: Exception | None = None

    def create_repo(self, repo_id: str, **kwargs) -> str:
        FakeApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs) -> None:
        if FakeApi.fail:
            raise FakeApi.fail
        folder = Path(kwargs["folder_path"])
        ignored = set(kwargs.get("ignore_patterns") or [])
        kwargs["files"] = sorted(p.name for p in folder.iterdir() if p.name not in ignored)
        FakeApi.calls.append(("upload_folder", kwargs))


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    FakeApi.calls, FakeApi.fail = [], None
    return FakeApi


def test_push_uploads_the_export(tmp_path, hub, capsys):
    run = make_run(tmp_path / "run")
    out = main(["--run", str(run), "--out", str(tmp_path / "hf"), "--push_to_hub", "someone/tiny-gpt"])
    assert [name for name, _ in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][1] == {"repo_id": "someone/tiny-gpt", "repo_type": "model", "exist_ok": True}
    upload = hub.calls[1][1]
    assert (
        upload["repo_id"] == "someone/tiny-gpt"
        and upload["repo_type"] == "model"
        and Path(upload["folder_path"]) == out
    )
    assert upload["ignore_patterns"] == [EXPORT_MARKER]
    assert upload["files"] == [
        "README.md",
        "config.json",
        "generation_config.json",
        "loss.png",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert "uploaded" in capsys.readouterr().out


def test_push_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = export_hf(make_run(tmp_path / "run"), tmp_path / "hf", log=lambda _m: None)
    with pytest.raises(UserError) as e:
        push_to_hub(out, "someone/tiny")
    assert (
        str(e.value)
        == f"--push_to_hub someone/tiny needs the network, and HF_HUB_OFFLINE is set: the export is complete in {out}; upload it later with `hf upload someone/tiny {out}`"
    )


def test_push_failure_is_one_clear_error(tmp_path, hub):
    # not logged in
    hub.fail = LocalTokenNotFoundError(
        "Token is required, but no token found. Log in with `hf auth login`.\nmore detail"
    )
    out = export_hf(make_run(tmp_path / "run"), tmp_path / "hf", log=lambda _m: None)
    with pytest.raises(
        UserError,
        match=r"uploading to the Hub repository someone/tiny failed \(Token is required, but no token found.*\): the export is complete in",
    ):
        push_to_hub(out, "someone/tiny")


@pytest.mark.parametrize("repo_id", ["tiny", "a/b/c", "someone/bad name", "someone/" + "x" * 200, "/tiny"])
def test_bad_repo_ids_fail_before_the_export(tmp_path, hub, repo_id):
    with pytest.raises(UserError, match="--push_to_hub"):
        main(["--run", str(make_run(tmp_path / "run")), "--out", str(tmp_path / "hf"), "--push_to_hub", repo_id])
    assert not (tmp_path / "hf").exists() and hub.calls == []


# ----------------------------------------------------------------------------- all or nothing


def test_overwrite_replaces_only_an_earlier_export(tmp_path):
    run = make_run(tmp_path / "run")
    out = export_hf(run, tmp_path / "hf", log=lambda _m: None)
    (out / "stale.txt").write_text("left from an earlier export")
    with pytest.raises(UserError, match="holds an earlier export; pass --overwrite"):
        export_hf(run, out, log=lambda _m: None)
    assert (out / "stale.txt").is_file()
    export_hf(run, out, overwrite=True, log=lambda _m: None)
    assert (
        not (out / "stale.txt").exists() and (out / "model.safetensors").is_file() and (out / EXPORT_MARKER).is_file()
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "hf", "run"]  # no temporary folders left


def test_a_failed_export_leaves_nothing_and_keeps_the_earlier_one(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    out = export_hf(run, tmp_path / "hf", log=lambda _m: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*_a, **_k):
        raise UserError("disk full while writing README.md")

    monkeypatch.setattr(dist_gpt.hub, "write_model_card", broken)
    for target, overwrite in ((out, True), (tmp_path / "new", False)):
        with pytest.raises(UserError, match="disk full"):
            export_hf(run, target, overwrite=overwrite, log=lambda _m: None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "hf", "run"]
