"""docs/attention.md runs as written, and its three aggregation forms agree with the model's attention."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from dist_gpt.model import CausalSelfAttention, GPTConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "attention.md"


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_doc_code_blocks_run_in_order(capsys):
    blocks = code_blocks(DOC.read_text())
    assert len(blocks) >= 8
    namespace: dict = {"__name__": "attention_doc"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name} block {i + 1}", "exec"), namespace)
    assert "variance unscaled" in capsys.readouterr().out


def test_three_aggregation_forms_and_model_attention_agree():
    torch.manual_seed(0)
    B, T, C = 2, 6, 8
    x = torch.randn(B, T, C)
    loop = torch.stack([torch.stack([x[b, : t + 1].mean(0) for t in range(T)]) for b in range(B)])
    tril = torch.tril(torch.ones(T, T))
    matmul = (tril / tril.sum(1, keepdim=True)) @ x
    softmax = F.softmax(torch.zeros(T, T).masked_fill(tril == 0, float("-inf")), dim=-1) @ x
    torch.testing.assert_close(loop, matmul)
    torch.testing.assert_close(loop, softmax)

    # the model's attention with every query and key zero gives uniform weights: the same average of the values
    attn = CausalSelfAttention(GPTConfig(vocab_size=5, block_size=T, n_embd=C, n_head=2, dropout=0.0)).eval()
    with torch.no_grad():
        attn.c_attn.weight[: 2 * C].zero_()
        attn.c_attn.bias.zero_()
        attn.c_proj.weight.copy_(torch.eye(C))
        attn.c_proj.bias.zero_()
        values = x @ attn.c_attn.weight[2 * C :].T  # (B, T, C)
        torch.testing.assert_close(attn(x), (tril / tril.sum(1, keepdim=True)) @ values)
