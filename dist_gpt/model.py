"""The GPT of "Let's build GPT", with the lecture's steps as config switches, a KV cache and sampling.

    model = GPT(GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384))
    logits, loss = model(idx, targets)                  # (B, T, V), scalar
    out = model.generate(idx, 500, temperature=0.8)     # (B, T0 + 500)

Module names follow nanoGPT / Hugging Face GPT-2 (`transformer.h.0.attn.c_attn`, ...), so the weights
map one to one onto `transformers`' GPT2LMHeadModel (whose Conv1D layers hold them transposed).
The model knows nothing of devices, precision or distribution: the training loop owns those.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_gpt.config import GPTConfig, check_model

__all__ = ["GPT", "GPTConfig", "KVCache", "CausalSelfAttention", "MLP", "Block", "IGNORE_INDEX", "sample_next"]

IGNORE_INDEX = -100
"""Targets equal to this contribute nothing to the loss (PyTorch's cross-entropy default)."""


def _layernorm(config: GPTConfig) -> nn.Module:
    return nn.LayerNorm(config.n_embd, bias=config.bias) if config.layernorm else nn.Identity()


class KVCache:
    """One attention layer's keys and values of the tokens seen so far.

    Buffers of shape (B, n_head, max_len, head_dim), allocated at the first `append` with the dtype and
    device of the keys (so autocast and devices are the caller's business), filled up to `length`.
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def reset(self) -> None:
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, t, hs) after the cached ones; return every key and value so far (B, nh, length, hs)."""
        if self.length == 0:  # (re)allocate at each prefill: batch, dtype and device follow the caller
            B, nh, _, hs = k.shape
            self.k = k.new_empty(B, nh, self.max_len, hs)
            self.v = v.new_empty(B, nh, self.max_len, hs)
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds at most {self.max_len} tokens, asked for {end}")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one fused q,k,v projection, SDPA, an output projection.

    n_head=1 is the lecture's single head (head size n_embd). Options: `qk_norm` RMS-normalises each
    head's queries and keys, `pos_emb=rope` rotates them by position, `attn_impl=matmul` writes the
    training attention as plain matmuls (`auto`, which the trainer resolves first, counts as sdpa here).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.head_dim = config.n_embd // config.n_head
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        self.rope = config.pos_emb == "rope"
        self.attn_impl = config.attn_impl
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # query, key, value of every head
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # back into the residual stream
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        if self.qk_norm:
            q, k = F.rms_norm(q, (self.head_dim,)).type_as(v), F.rms_norm(k, (self.head_dim,)).type_as(v)
        if self.rope:  # positions count from the window start: the cached tokens come first
            start = cache.length if cache is not None else 0
            q, k = rotate(q, start), rotate(k, start)
        if cache is not None:
            y = self._attend_cached(q, k, v, cache)
        elif self.attn_impl == "matmul":
            y = self._attend_matmul(q, k, v)
        else:  # training and full recomputation
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def _attend_matmul(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The lecture's attention, written out: softmax(q k^T / sqrt(hs), causal) v."""
        T = q.size(2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, nh, T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(diagonal=1)  # (T, T)
        att = F.dropout(att.masked_fill(future, float("-inf")).softmax(dim=-1), self.dropout, self.training)
        return att @ v  # (B, nh, T, hs)

    @staticmethod
    def _attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The T new queries attend to the cached keys and to the new keys up to their own position."""
        past, T = cache.length, q.size(2)
        k, v = cache.append(k, v)  # (B, nh, past + T, hs)
        if past == 0:  # prefill: ordinary causal attention
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if T == 1:  # one new token sees everything
            return F.scaled_dot_product_attention(q, k, v)
        mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)  # (T, past + T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def rotate(x: torch.Tensor, start: int, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (RoPE) of x (B, nh, T, hs) for positions start .. start + T - 1.

    Feature pairs (i, i + hs/2) turn by the angle position / base^(2i / hs), so the dot product of a
    query and a key depends on their distance only.
    """
    T, half = x.size(2), x.size(3) // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float32, device=x.device) / half)  # (hs/2,)
    angle = torch.arange(start, start + T, dtype=torch.float32, device=x.device)[:, None] * inv_freq  # (T, hs/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class MLP(nn.Module):
    """Position-wise feed-forward: Linear to mlp_ratio * n_embd, non-linearity, Linear back."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.act = {
            "gelu": nn.GELU(approximate="tanh"),
            "gelu_exact": nn.GELU(),
            "relu": nn.ReLU(),
            "relu2": _ReLUSquared(),
        }[config.activation]
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class _ReLUSquared(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    The lecture's switches: `residual=False` drops the two additions, `mlp=False` the MLP sublayer,
    `layernorm=False` turns ln_1 and ln_2 into identities.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.residual = config.residual
        self.ln_1 = _layernorm(config)
        self.attn = CausalSelfAttention(config)
        self.has_mlp = config.mlp
        if config.mlp:
            self.ln_2 = _layernorm(config)
            self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if self.residual:
            x = x + self.attn(self.ln_1(x), cache)
            if self.has_mlp:
                x = x + self.mlp(self.ln_2(x))
        else:
            x = self.attn(self.ln_1(x), cache)
            if self.has_mlp:
                x = self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """A decoder-only Transformer language model, or (kind=bigram) the lecture's bigram lookup table."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        check_model(config, building=True)
        self.config = config
        self.is_bigram = config.kind == "bigram"
        if self.is_bigram:
            # row i holds the logits of the token that follows token i
            self.bigram_table = nn.Embedding(config.vocab_size, config.vocab_size)
        else:
            # token embedding, also the LM head when tied
            layers = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
            if config.pos_emb == "learned":  # (rope rotates queries and keys in attention instead)
                layers["wpe"] = nn.Embedding(config.block_size, config.n_embd)  # learned position embedding
            layers.update(
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=_layernorm(config),
            )
            self.transformer = nn.ModuleDict(layers)
            if not config.tie_weights:
                self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.init == "gpt2":  # (init=torch keeps PyTorch's layer defaults, as the lecture video did)
            self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # the projections into the residual stream
                if config.zero_init_proj:  # start each block as the identity
                    nn.init.zeros_(p)
                elif config.init == "gpt2":  # GPT-2: scaled down by depth
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # --- forward ---------------------------------------------------------------------------------

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_logits: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, V) for token ids idx (B, T), and the mean cross-entropy against targets (B, T).

        Targets equal to IGNORE_INDEX (-100) do not count: SFT trains on the response tokens only. A batch with no
        counted target gives a loss of 0 rather than NaN. The loss is computed in fp32 whatever the compute precision.
        return_logits=False (training) returns (None, loss), so no (B, T, V) tensor outlives the loss.
        """
        logits = self.bigram_table(idx) if self.is_bigram else self._head(self._body(idx))  # (B, T, V)
        if targets is None:
            return logits, None
        targets = targets.reshape(-1)
        loss_sum = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        loss = loss_sum / (targets != IGNORE_INDEX).sum().clamp(min=1)
        return (logits if return_logits else None), loss

    def _body(self, idx: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C). With caches, idx holds the tokens after the cached ones."""
        B, T = idx.size()
        start = caches[0].length if caches else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.pos_emb == "learned":
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
            x = x + self.transformer.wpe(pos)  # (T, C) broadcast over the batch
        x = self.transformer.drop(x)
        if caches is None:
            for block in self.transformer.h:
                x = block(x)
        else:
            for block, cache in zip(self.transformer.h, caches, strict=True):
                x = block(x, cache)
        return self.transformer.ln_f(x)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., C) to logits (..., V); tied: the token embedding matrix itself."""
        if self.config.tie_weights:
            return F.linear(x, self.transformer.wte.weight)
        return self.lm_head(x)

    def _next_logits(self, idx: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """Logits (B, V) of the token after idx (B, T); with caches, idx continues the cached tokens."""
        if self.is_bigram:
            return self.bigram_table(idx[:, -1])
        return self._head(self._body(idx, caches)[:, -1])

    # --- size and cost ---------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; a tied embedding counts once. non_embedding leaves out the position embedding (nanoGPT's convention)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.is_bigram and self.config.pos_emb == "learned":
            n -= self.transformer.wpe.weight.numel()
        return n

    def estimate_flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token: 6 * N + 12 * n_layer * n_head * head_dim * T.

        N = the weights that take part in matmuls: num_params(non_embedding=True), less an untied token embedding
        (a lookup); each does one multiply-add (2 FLOPs) forward and two backward. The second term is attention's scores and weighted sum at context T (default
        block_size), counted over the full square as PaLM's appendix does. MFU = this * tokens/s / peak FLOP/s.
        The bigram table does lookups, not matmuls: 0.
        """
        if self.is_bigram:
            return 0
        c = self.config
        T = seq_len or c.block_size
        matmul_params = self.num_params(non_embedding=True)
        if not c.tie_weights:  # the token embedding is a lookup; only a tied one is also the LM head's matmul
            matmul_params -= self.transformer.wte.weight.numel()
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * T

    # --- sampling --------------------------------------------------------------------------------

    @contextmanager
    def _inference(self) -> Iterator[None]:
        """No autograd and eval mode (no dropout) for one step; the previous mode comes back after."""
        was_training = self.training
        if was_training:
            self.train(False)
        try:
            with torch.no_grad():
                yield
        finally:
            if was_training:
                self.train(True)

    def generate_stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Yield max_new_tokens new token ids, one (B,) tensor per step, continuing idx (B, T0).

        Same arguments as `generate`. The model is in eval mode only while a step computes, so a
        stream left half-consumed does not change the model's mode.
        """
        _check_sampling(temperature, top_k, top_p)  # now, not at the first next()
        return self._stream(idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache)

    def _stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        generator: torch.Generator | None,
        use_cache: bool,
    ) -> Iterator[torch.Tensor]:
        decoder = token = None
        for _ in range(max_new_tokens):
            with self._inference():
                if decoder is None:
                    decoder = _Decoder(self, idx, use_cache)
                else:
                    decoder.push(token)
                token = sample_next(decoder.logits, temperature, top_k, top_p, generator)
            yield token

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Continue idx (B, T0) by max_new_tokens sampled tokens; returns (B, T0 + max_new_tokens).

        temperature 0 is greedy (argmax); top_k keeps the k likeliest tokens; top_p keeps the smallest
        set whose probability reaches p (nucleus); `generator` makes the draws reproducible.

        Sliding window (the same with and without the cache, so both give the same logits): the model
        sees the tokens from a window start to now. The prompt's last block_size tokens start it; when a
        new token would make it longer than block_size, the window jumps forward to keep the last
        block_size // 2 tokens, and with the cache on, the cache is rebuilt from that cropped window.
        So the cache costs one prefill per block_size // 2 new tokens and stays exact.
        use_cache=False recomputes the whole window at every step (for comparison).
        """
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache))
        if not new:
            return idx.clone()
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1)


class _Decoder:
    """Next-token logits for a growing sequence under the sliding-window policy of `GPT.generate`.

    `logits` (B, V) predicts the token after the current window; `push(token)` appends one token per row.
    """

    def __init__(self, model: GPT, idx: torch.Tensor, use_cache: bool):
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"idx must be (B, T) with T >= 1, got shape {tuple(idx.shape)}")
        self.model = model
        self.block_size = model.config.block_size
        self.keep = max(1, self.block_size // 2)
        use_cache = use_cache and not model.is_bigram  # the bigram looks at one token: nothing to cache
        self.caches = [KVCache(self.block_size) for _ in range(model.config.n_layer)] if use_cache else None
        self.window = idx[:, -self.block_size :]  # (B, <= block_size)
        self.logits = self._prefill()

    def _prefill(self) -> torch.Tensor:
        if self.caches is not None:
            for cache in self.caches:
                cache.reset()
        return self.model._next_logits(self.window, self.caches)

    def push(self, token: torch.Tensor) -> None:
        self.window = torch.cat([self.window, token.view(-1, 1).to(self.window.dtype)], dim=1)
        if self.window.size(1) > self.block_size:  # slide: keep the last block_size // 2 tokens, rebuild
            self.window = self.window[:, -self.keep :]
            self.logits = self._prefill()
        elif self.caches is None:
            self.logits = self.model._next_logits(self.window)
        else:
            self.logits = self.model._next_logits(self.window[:, -1:], self.caches)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row from logits (B, V); returns (B,). temperature 0 is argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # (B, V): probability of the likelier tokens
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))  # the likeliest always stays
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """The one check of the sampling arguments (sample.py reports its ValueError as a user error)."""
    min_temperature = 1e-6  # below this, logits / temperature overflows float32 for ordinary logits: NaN probabilities
    if not (math.isfinite(temperature) and (temperature == 0 or temperature >= min_temperature)):
        raise ValueError(
            f"temperature must be 0 (greedy) or a finite number >= {min_temperature:g} (smaller ones overflow the logits), got {temperature:g}"
        )
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p:g}")
