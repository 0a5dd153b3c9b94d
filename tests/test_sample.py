"""launch/sample.py as a user runs it: samples alone on stdout, reproducible seeds, one-line errors."""

from __future__ import annotations

import argparse
import io
import os

import pytest
import torch
from conftest import REPO, run_script
from safetensors.torch import save_file

from dist_gpt.config import Config, save_config
from dist_gpt.model import GPT
from dist_gpt.sample import SEPARATOR, StreamPrinter, generate_samples
from dist_gpt.tokenizers import train_tokenizer

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\nPROMPT:\nRESPONSE:\n\n"
ENV = {
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
}  # also without `pip install -e .`


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as pretrain leaves it: config.yaml, tokenizer.json, model.safetensors (a tiny random model)."""
    path = tmp_path_factory.mktemp("run")
    tokenizer = train_tokenizer("char", [TEXT], vocab_size=0)
    tokenizer.save(path / "tokenizer.json")
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd, m.dropout = tokenizer.vocab_size, 16, 2, 2, 16, 0.0
    save_config(cfg, path / "config.yaml")
    torch.manual_seed(0)
    save_file(GPT(m).state_dict(), path / "model.safetensors")
    return path


def sample(run_dir, *args: str):
    return run_script("sample.py", "--run", str(run_dir), *args, env=ENV, timeout=120)


def assert_one_line_error(result, *words: str) -> None:
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_one_sample_goes_alone_to_stdout_and_same_seed_reproduces(run_dir):
    first = sample(run_dir, "--prompt", "To be", "--max_new_tokens", "30", "--seed", "3")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("To be") and first.stdout.endswith("\n")
    assert len(first.stdout) == len("To be") + 30 + 1  # the char tokenizer: one character per token, then a newline
    assert "loaded run" in first.stderr and "tokens/s" in first.stderr and "tokens/s" not in first.stdout
    again = sample(run_dir, "--prompt", "To be", "--max_new_tokens", "30", "--seed", "3")
    other = sample(run_dir, "--prompt", "To be", "--max_new_tokens", "30", "--seed", "4")
    assert again.stdout == first.stdout and other.stdout != first.stdout


def test_several_samples_are_separated_and_kv_cache_does_not_change_them(run_dir):
    args = [
        "--prompt",
        "be",
        "--max_new_tokens",
        "40",
        "--num_samples",
        "3",
        "--top_k",
        "5",
        "--top_p",
        "0.9",
        "--temperature",
        "0.8",
    ]
    cached = sample(run_dir, *args)
    assert cached.returncode == 0, cached.stderr
    samples = cached.stdout.split(SEPARATOR + "\n")
    assert len(samples) == 3 and all(s.startswith("be") and len(s) == 2 + 40 + 1 for s in samples)
    assert sample(run_dir, *args, "--no_kv_cache").stdout == cached.stdout  # 42 > block_size 16: the window slides


def test_errors_are_one_line(run_dir, tmp_path):
    assert_one_line_error(sample(tmp_path / "nope", "--prompt", "To"), "run directory not found")
    assert_one_line_error(sample(run_dir, "--prompt", "To be ZQX"), "Z", "Q", "X")  # characters the corpus never had
    assert_one_line_error(sample(run_dir, "--prompt", "To", "--top_p", "2"), "--top_p")

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.yaml", "tokenizer.json"):
        (broken / name).write_bytes((run_dir / name).read_bytes())
    (broken / "model.safetensors").write_bytes((run_dir / "model.safetensors").read_bytes()[:500])
    assert_one_line_error(sample(broken, "--prompt", "To"), "model.safetensors")


def test_help_explains_every_flag():
    result = run_script("sample.py", "--help", env=ENV, timeout=60)
    assert result.returncode == 0
    for flag in (
        "--run",
        "--prompt",
        "--max_new_tokens",
        "--temperature",
        "--top_k",
        "--top_p",
        "--num_samples",
        "--seed",
        "--no_kv_cache",
        "--device",
        "--chat",
    ):
        assert flag in result.stdout


def test_chat_wraps_the_prompt_in_the_sft_template(run_dir):
    from dist_gpt.tokenizers import RESPONSE_END, render_prompt

    result = sample(run_dir, "--chat", "--prompt", "be", "--max_new_tokens", "40")
    assert result.returncode == 0, result.stderr
    wrapped = render_prompt("be")
    assert result.stdout.startswith(wrapped)
    assert RESPONSE_END not in result.stdout[len(wrapped) : -1]  # printed only up to the end of the response


# ----------------------------------------------------------------------------- in process: streaming and stopping


class Letters:
    """A stand-in tokenizer: id i is the i-th letter of an alphabet; id 9 decodes to half a character (U+FFFD)."""

    alphabet = "ab\n cdefg"

    def decode(self, ids):
        return "".join(self.alphabet[i] if i < len(self.alphabet) else "\ufffd" for i in ids)

    def encode(self, text):
        return [self.alphabet.index(c) for c in text]


def test_stream_printer_holds_back_what_may_change():
    out = io.StringIO()
    printer = StreamPrinter(Letters(), out, stop="\n\n")
    assert not printer.feed(0) and out.getvalue() == "a"
    assert not printer.feed(2) and out.getvalue() == "a"  # "\n" may start the stop string
    assert not printer.feed(1) and out.getvalue() == "a\nb"
    assert not printer.feed(9) and out.getvalue() == "a\nb"  # an incomplete character
    assert printer.feed(2) is False
    assert printer.feed(2) is True  # "\n\n": the end of the response
    printer.finish()
    assert out.getvalue() == "a\nb\ufffd\n"


def test_chat_style_stop_ends_every_sample():
    class Model:  # always continues with "a\n\n" and then junk
        config = argparse.Namespace(vocab_size=10, block_size=8)

        def parameters(self):
            yield torch.zeros(1)

        def generate_stream(self, idx, max_new_tokens, **kwargs):
            for token in [0, 2, 2, 4, 4, 4][:max_new_tokens]:
                yield torch.full((idx.size(0),), token)

    opts = argparse.Namespace(
        max_new_tokens=6, num_samples=2, seed=0, temperature=1.0, top_k=None, top_p=None, no_kv_cache=False
    )
    out, err = io.StringIO(), io.StringIO()
    generate_samples(Model(), Letters(), "b", [1], opts, out, err, stop="\n\n")
    assert out.getvalue() == f"ba\n{SEPARATOR}\nba\n"
    out = io.StringIO()
    generate_samples(
        Model(), Letters(), "b", [1], argparse.Namespace(**{**vars(opts), "num_samples": 1}), out, err, stop="\n\n"
    )
    assert out.getvalue() == "ba\n"
