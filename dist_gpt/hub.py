"""The model card of an export and its upload to the Hugging Face Hub.

    write_model_card(run, "hf/my_model", n_params)   # README.md (+ loss.png) from the run directory's records
    push_to_hub(Path("hf/my_model"), "me/my_model")   # create the repo if needed, upload the folder

The card says what the model is and how it was made, from what the run directory holds: config.yaml
(architecture, data, training settings), the prepared data's meta.json (its fingerprint), summary.json
(steps, tokens, final losses), parent.json (a finetune's parent), samples.jsonl (the last sample) and
metrics.jsonl (the loss plot). What a run does not have is written as "not recorded", never guessed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from dist_gpt.config import clip, shorten
from dist_gpt.errors import UserError
from dist_gpt.io import atomic_write_text

CARD = "README.md"
PLOT = "loss.png"


# ----------------------------------------------------------------------------- what the run recorded


def read_record(path: Path) -> dict:
    """A JSON object the run wrote, or {} when it is missing or unreadable (a card states what is known)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def last_sample(run_dir: Path) -> dict:
    """The newest complete line of samples.jsonl ({} without one)."""
    try:
        lines = (run_dir / "samples.jsonl").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            return row
    return {}


def fenced(text: str, lang: str = "text") -> str:
    """A Markdown code block that no run of backticks inside `text` can close."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text}\n{fence}"


def known(value: Any) -> Any:
    return "not recorded" if value in (None, "") else value


def cell(value: Any, limit: int = 200) -> str:
    """A value as one Markdown table cell: one line, no column break, at most `limit` characters."""
    return shorten(" ".join(str(known(value)).split()), limit).replace("|", "\\|")


def read_curves(run_dir: Path) -> Any:
    """The run's losses from metrics.jsonl (a dist_gpt.plot.Curves), or None when it has none."""
    from dist_gpt.plot import read_metrics

    try:
        return read_metrics(run_dir)
    except UserError:
        return None


def draw_loss(curves: Any, out: Path) -> None:
    """loss.png in `out`, as launch/plot.py draws it."""
    import matplotlib.pyplot as plt

    from dist_gpt.plot import plot_runs

    plt.close(plot_runs([curves], out / PLOT))


# ----------------------------------------------------------------------------- the card


def model_card(run: Any, n_params: int, curves: Any = None) -> str:
    """The README.md text of an export of `run` (a LoadedRun); `curves` (its losses) adds the plot."""
    cfg, run_dir = run.config, Path(run.run_dir)
    m, d, t, f = cfg.model, cfg.data, cfg.train, cfg.finetune
    summary = read_record(run_dir / "summary.json")
    meta = read_record(Path(cfg.data_dir) / "meta.json")
    tokens = meta.get("tokens") if isinstance(meta.get("tokens"), dict) else {}
    sample = last_sample(run_dir)

    def loss(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "not recorded"

    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- gpt2",
        "- dist_gpt",
        "---",
        "",
        f"# {cell(run_dir.resolve().name)}",
        "",
        f"A GPT-2-architecture language model of {n_params / 1e6:.2f}M parameters trained with dist_gpt, exported as a "
        "`transformers` GPT-2 model (float32 safetensors).",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER_OR_REPO")',
        'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER_OR_REPO")',
        "```",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {n_params:,} |",
        f"| layers x heads x width | {m.n_layer} x {m.n_head} x {m.n_embd} |",
        f"| context (block_size) | {m.block_size} tokens |",
        f"| vocabulary | {m.vocab_size} |",
        f"| MLP | {m.mlp_ratio} x width, {m.activation}{'' if m.mlp else ' (exported as a zero MLP: the model has none)'} |",
        f"| biases / tied head / dropout | {m.bias} / {m.tie_weights} / {m.dropout} |",
        "",
        "## Tokenizer",
        "",
        f"`{run.tokenizer.kind}`, {run.tokenizer.vocab_size} tokens (`tokenizer.json`, loaded by `AutoTokenizer`).",
        "",
        "## Data",
        "",
        "| | |",
        "|---|---|",
        f"| name | {cell(d.name)} |",
        f"| source | {cell(d.source)} |",
        f"| fingerprint of the prepared data | {cell(meta.get('fingerprint'))} |",
        f"| tokens (train / val) | {cell(tokens.get('train'))} / {cell(tokens.get('val'))} |",
    ]
    if f.init_from:
        parent = read_record(run_dir / "parent.json").get("parent")
        how = f"{f.kind}{f', LoRA rank {f.lora_rank}' if f.lora_rank else ''}"
        lines.append(f"| finetuned from | {cell((parent or {}).get('init_from') or f.init_from)} ({how}) |")
    lines += [
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| optimizer steps | {cell(summary.get('steps'))} of max_steps {t.max_steps} |",
        f"| tokens seen | {cell(summary.get('tokens_seen'))} ({cell(summary.get('tokens_per_step'))} per step, {cell(summary.get('world_size'))} process(es)) |",
        f"| batch | {t.batch_size} sequences x {m.block_size} tokens, grad_accum {t.grad_accum}, tokens_per_step {t.tokens_per_step} |",
        f"| optimizer | {t.optimizer}, lr {t.lr} -> {t.min_lr} ({t.lr_decay}, {t.warmup_steps} warmup steps), weight decay {t.weight_decay} |",
        f"| precision / seed | {t.mixed_precision} / {cfg.run.seed} |",
        f"| wall time | {cell(summary.get('wall_s'))} s |",
        "",
        "## Final losses (nats/token)",
        "",
        f"validation {loss(summary.get('final_val_loss'))} (best {loss(summary.get('best_val_loss'))}); "
        f"last logged training batch {loss(curves.train[-1][2] if curves and curves.train else None)}",
        "",
    ]
    if curves:
        lines += [f"![train and validation loss]({PLOT})", ""]
    lines += ["## A sample", ""]
    if sample:
        prompt = str(sample.get("prompt", ""))
        lines += [
            f"At step {cell(sample.get('step'))}, from the prompt {clip(prompt)}:",
            "",
            fenced(prompt + sample["text"]),
            "",
        ]
    else:
        lines += ["not recorded (the run has no samples.jsonl)", ""]
    return "\n".join(lines)


def write_model_card(run: Any, out: Path, n_params: int) -> Path:
    """README.md (and loss.png when the run logged losses) into the export folder `out`."""
    curves = read_curves(Path(run.run_dir))
    if curves:
        draw_loss(curves, out)
    atomic_write_text(out / CARD, model_card(run, n_params, curves))
    return out / CARD


# ----------------------------------------------------------------------------- the Hub


def _offline() -> bool:
    return any(
        os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def check_repo_id(repo_id: str) -> None:
    """OWNER/NAME as the Hub accepts it, or a UserError (checked before any work)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1:
        raise UserError(
            f"--push_to_hub needs OWNER/NAME (a Hub user or organisation and a model name), got {clip(repo_id)}"
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(
            f"--push_to_hub {clip(repo_id)} is not a valid Hub repository id: letters, digits, '-', '_' and '.', at most 96 characters"
        ) from None


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Create the model repo `repo_id` if needed and upload `folder` (all but the export marker); returns the repo URL."""
    from dist_gpt.hf import EXPORT_MARKER

    later = f"the export is complete in {folder}; upload it later with `hf upload {repo_id} {folder}`"
    if _offline():
        raise UserError(f"--push_to_hub {repo_id} needs the network, and HF_HUB_OFFLINE is set: {later}")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            ignore_patterns=[EXPORT_MARKER],
            commit_message=f"Upload {folder.name}, exported by dist_gpt",
        )
    except (HfHubHTTPError, OSError, ValueError) as e:  # no token, no network, no permission, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"uploading to the Hub repository {repo_id} failed ({shorten(reason, 160)}): {later}") from None
    print(f"uploaded {folder} to {url}")
    return str(url)
