"""Medusa-1, EAGLE-1 and EAGLE-3 drafters for a frozen teacher: the baselines a CLLM is
compared with, trained by the same loop on the same data.

Each drafter is a small torch module whose ``state_dict`` names are exactly the tensor
names vLLM 0.32 loads for its method (``model_executor/models/medusa.py``,
``llama_eagle.py``, ``llama_eagle3.py``), and whose ``save_pretrained`` writes the
``config.json`` that selects that method's model class. vLLM's loaders drop names they
do not know and never report missing ones, so the names here are the contract; the
tests compare them with the modules vLLM builds.

What each drafter sees at serving time, and so what it is trained on:

* Medusa: the teacher's final (post-norm) hidden state at the last accepted position
  ``t``; head ``h`` predicts the token at ``t + h + 2`` (the teacher's own head gives
  ``t + 1``). The heads run in parallel; vLLM chains their top-1 tokens.
* EAGLE-1: ``fc(concat(embed(x[t+1]), f[t]))`` through one decoder layer without input
  norm; the result ``g[t]`` goes to the teacher's ``lm_head`` as it is (no final norm)
  and is the hidden input of the next draft step. ``f`` is the teacher's post-norm final
  hidden state. Trained to regress ``f[t+1]`` and to predict ``x[t+2]`` (Li et al. 2024).
* EAGLE-3: ``fc`` over the concatenation of the teacher's residual stream after chosen
  layers (vLLM's ``eagle_aux_hidden_state_layer_ids``; HF ``hidden_states[i]``); the
  layer's attention reads ``concat(norm(embed), norm(hidden))``; a final norm and its own
  ``lm_head``; the pre-norm output is the next step's hidden input. Trained on the token
  loss only, unrolled over draft steps ("training-time test", Li et al. 2025).

Unrolling (``steps`` > 1, used for EAGLE-1 and EAGLE-3): step ``j`` at position ``i``
is the j-th draft after the prefix ending at ``i - j``. Its hidden input is step
``j - 1``'s output at ``i - 1`` and it attends to what vLLM's KV cache would hold then:
step-0 keys up to ``i - j`` and its own chain's keys at ``i - j + 1 .. i``
(:func:`chain_attention_mask`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .losses import ar_loss

KINDS = ("medusa", "eagle", "eagle3")


# ---------------------------------------------------------------------------------------
# Pure pieces


def shifted_token_loss(logits: torch.Tensor, ids: torch.Tensor, loss_mask: torch.Tensor,
                       shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample CE and top-1 accuracy of ``logits[:, t]`` predicting ``ids[:, t + shift]``.

    ``logits`` covers positions ``0 .. T - shift - 1``; ``loss_mask`` marks the tokens that
    count as targets (the teacher's output). Returns ``(loss, accuracy)``, shape ``[B]``.
    """
    labels, mask = ids[:, shift:], loss_mask[:, shift:]
    logits = logits[:, : labels.shape[1]]
    loss = ar_loss(logits, labels, mask)
    m = mask.float()
    hit = (logits.argmax(-1) == labels).float()
    return loss, (hit * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def chain_attention_mask(length: int, step: int, device=None) -> torch.Tensor:
    """Which keys a query of unrolled draft step ``step`` sees, ``[T, (step + 1) * T]``.

    Keys are laid out as ``[step-0 keys | step-1 keys | ... | step keys]``. Query ``i``
    sees step-0 keys at ``<= i - step`` (the prefix vLLM holds in its cache) and, for each
    ``m`` in ``1 .. step``, the step-``m`` key at ``i - (step - m)`` (its own chain).
    """
    i = torch.arange(length, device=device)[:, None]
    k = torch.arange(length, device=device)[None, :]
    parts = [k <= i - step]
    for m in range(1, step + 1):
        parts.append(k == i - (step - m))
    return torch.cat(parts, dim=1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama's rotary embedding (neox layout, as HF checkpoints and vLLM use), ``[B, h, T, d]``."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = positions.float()[..., None] * inv
    cos = torch.cat((ang, ang), -1).cos()[:, None].to(x.dtype)
    sin = torch.cat((ang, ang), -1).sin()[:, None].to(x.dtype)
    return x * cos + _rotate_half(x) * sin


# ---------------------------------------------------------------------------------------
# Teacher features


class TeacherFeatures:
    """What a drafter reads from the frozen teacher for one batch (no gradients)."""

    def __init__(self, teacher, input_ids, attention_mask, aux_layers=()):
        with torch.no_grad():
            out = teacher.model(input_ids=input_ids, attention_mask=attention_mask,
                                output_hidden_states=bool(aux_layers))
            self.final = out.last_hidden_state
            self.aux = (torch.cat([out.hidden_states[i] for i in aux_layers], -1)
                        if aux_layers else None)
            self.embeds = teacher.get_input_embeddings()(input_ids)
        self.lm_head = teacher.get_output_embeddings().weight.detach()


class _VLLMExport:
    """``save_pretrained`` as the trainer calls it (checkpoints and the final model), in
    vLLM's format: the module's own tensor names and ``vllm_config()``."""

    def save_pretrained(self, out_dir, state_dict=None, safe_serialization=True, **_):
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else self.state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                  str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps(self.vllm_config(), indent=2) + "\n")


# ---------------------------------------------------------------------------------------
# Medusa


class _ResidualBlock(nn.Module):
    def __init__(self, hidden: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden, bias=False)
                                    for _ in range(layers))
        for layer in self.layers:  # starts as the identity, as Medusa does
            nn.init.zeros_(layer.weight)

    def forward(self, x):
        for layer in self.layers:
            x = x + F.silu(layer(x))
        return x


class MedusaHeads(_VLLMExport, nn.Module):
    """Medusa-1 heads: ``blocks.{h}.layers.{l}.weight``, ``lm_heads.{h}.weight``."""

    kind = "medusa"
    aux_layers: tuple[int, ...] = ()

    def __init__(self, teacher_config, num_heads: int = 4, num_layers: int = 1,
                 lm_head: torch.Tensor | None = None, decay: float = 0.8):
        super().__init__()
        h, v = teacher_config.hidden_size, teacher_config.vocab_size
        self.hidden_size, self.vocab_size = h, v
        self.num_heads, self.num_layers, self.decay = num_heads, num_layers, decay
        self.blocks = nn.ModuleList(_ResidualBlock(h, num_layers) for _ in range(num_heads))
        self.lm_heads = nn.ModuleList(nn.Linear(h, v, bias=False) for _ in range(num_heads))
        if lm_head is not None:  # Medusa starts each head from the teacher's
            for head in self.lm_heads:
                head.weight.data.copy_(lm_head)

    def forward(self, feats: TeacherFeatures, ids, loss_mask):
        """Per-sample losses and per-head top-1 accuracy on the teacher's output."""
        total, weight, out = 0.0, 0.0, {}
        for k in range(self.num_heads):
            logits = self.lm_heads[k](self.blocks[k](feats.final[:, : ids.shape[1] - k - 2]))
            loss, acc = shifted_token_loss(logits, ids, loss_mask, k + 2)
            total = total + self.decay ** k * loss
            weight += self.decay ** k
            out[f"acc{k}"] = acc
        return {"loss": total / weight, **out}

    def vllm_config(self) -> dict:
        return {"architectures": ["MedusaModel"], "model_type": "medusa",
                "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
                "num_heads": self.num_heads, "num_hidden_layers": self.num_layers,
                "dtype": "float32"}


# ---------------------------------------------------------------------------------------
# EAGLE-1 and EAGLE-3: one Llama decoder layer with unrolled-chain attention


class _RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class _Attention(nn.Module):
    def __init__(self, cfg, in_width: int):
        super().__init__()
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.theta = cfg.rope_parameters["rope_theta"] if getattr(
            cfg, "rope_parameters", None) else getattr(cfg, "rope_theta", 10000.0)
        self.q_proj = nn.Linear(in_width, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(in_width, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(in_width, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def project(self, x, positions):
        b, t, _ = x.shape

        def split(y, n):
            return y.view(b, t, n, self.head_dim).transpose(1, 2)

        q = rope(split(self.q_proj(x), self.heads), positions, self.theta)
        k = rope(split(self.k_proj(x), self.kv_heads), positions, self.theta)
        v = split(self.v_proj(x), self.kv_heads)
        rep = self.heads // self.kv_heads
        return q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)

    def attend(self, q, keys, values, mask):
        """``q`` of one step against the concatenated keys of steps ``0 .. step``."""
        b, _, t, _ = q.shape
        out = F.scaled_dot_product_attention(q, torch.cat(keys, 2), torch.cat(values, 2),
                                             attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class _MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h, m = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, m, bias=False)
        self.up_proj = nn.Linear(h, m, bias=False)
        self.down_proj = nn.Linear(m, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _DraftLayer(nn.Module):
    """The decoder layer both EAGLE variants use, names as in HF Llama checkpoints."""

    def __init__(self, cfg, attn_in: int, input_norm: bool, hidden_norm: bool):
        super().__init__()
        eps = cfg.rms_norm_eps
        if input_norm:
            self.input_layernorm = _RMSNorm(cfg.hidden_size, eps)
        if hidden_norm:
            self.hidden_norm = _RMSNorm(cfg.hidden_size, eps)
        self.self_attn = _Attention(cfg, attn_in)
        self.post_attention_layernorm = _RMSNorm(cfg.hidden_size, eps)
        self.mlp = _MLP(cfg)


class _ChainDrafter(_VLLMExport, nn.Module):
    """Shared unrolled training of EAGLE-1/EAGLE-3 (see the module docstring)."""

    aux_layers: tuple[int, ...] = ()

    def __init__(self, teacher_config, steps: int, decay: float):
        super().__init__()
        self.teacher_config = teacher_config
        self.steps, self.decay = steps, decay

    def first_hidden(self, feats):
        """The first draft step's hidden input, from the teacher."""
        raise NotImplementedError

    def layer_input(self, embeds, hidden):
        """``(attention input, residual)`` of the decoder layer."""
        raise NotImplementedError

    def layer_output(self, x, feats):
        """``(what the LM head reads, the next draft step's hidden input)``."""
        raise NotImplementedError

    def lm_head_weight(self, feats):
        raise NotImplementedError

    def forward(self, feats: TeacherFeatures, ids, loss_mask):
        """Per-sample losses and per-step top-1 accuracy on the teacher's output."""
        b, t = ids.shape
        layer = self.layers[0]
        positions = torch.arange(t, device=ids.device)[None].expand(b, -1)
        # Input at position i: the token x[i + 1] and the hidden state of position i.
        embeds = torch.cat([feats.embeds[:, 1:], feats.embeds[:, -1:]], 1)
        hidden = self.first_hidden(feats)
        keys, values, total, weight, out = [], [], 0.0, 0.0, {}
        for j in range(self.steps):
            x, residual = self.layer_input(embeds, hidden)
            q, k, v = layer.self_attn.project(x, positions)
            keys.append(k)
            values.append(v)
            mask = chain_attention_mask(t, j, ids.device)
            x = layer.self_attn.attend(q, keys, values, mask) + residual
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            head_in, next_hidden = self.layer_output(x, feats)
            # Step j at position i drafts x[i + 2] (the prefix ends at i - j).
            logits = F.linear(head_in[:, : t - 2], self.lm_head_weight(feats))
            valid = loss_mask.clone()
            valid[:, : j + 2] = 0  # the prefix i - j must exist
            loss, acc = shifted_token_loss(logits, ids, valid, 2)
            total = total + self.decay ** j * self.step_loss(loss, next_hidden, feats,
                                                             loss_mask)
            weight += self.decay ** j
            out[f"acc{j}"] = acc
            hidden = torch.cat([torch.zeros_like(next_hidden[:, :1]), next_hidden[:, :-1]], 1)
        return {"loss": total / weight, **out}

    def step_loss(self, token_loss, next_hidden, feats, loss_mask):
        return token_loss


_LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
                 "max_position_embeddings", "rope_parameters", "rope_theta", "attention_bias",
                 "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id")


def _llama_fields(cfg) -> dict:
    """The one-layer draft's Llama config: the teacher's shapes, nothing of its origin."""
    out = {k: getattr(cfg, k) for k in _LLAMA_FIELDS if getattr(cfg, k, None) is not None}
    return {"model_type": "llama", **out, "num_hidden_layers": 1,
            "tie_word_embeddings": False, "dtype": "float32"}


class EagleDrafter(_ChainDrafter):
    """EAGLE-1: ``fc.weight`` [H, 2H] and ``layers.0.*`` without ``input_layernorm``; the
    teacher's embedding and ``lm_head`` are shared (not saved)."""

    kind = "eagle"

    def __init__(self, teacher_config, steps: int = 1, decay: float = 0.8,
                 regression_weight: float = 1.0, token_weight: float = 0.1):
        super().__init__(teacher_config, steps, decay)
        h = teacher_config.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.layers = nn.ModuleList([_DraftLayer(teacher_config, h, False, False)])
        self.regression_weight, self.token_weight = regression_weight, token_weight

    def first_hidden(self, feats):
        return feats.final

    def layer_input(self, embeds, hidden):
        x = self.fc(torch.cat([embeds, hidden], -1))
        return x, x

    def layer_output(self, x, feats):
        return x, x

    def lm_head_weight(self, feats):
        return feats.lm_head

    def step_loss(self, token_loss, next_hidden, feats, loss_mask):
        # EAGLE's objective: regress the teacher's next feature f[i + 1] (where x[i + 1]
        # is an output token) plus a down-weighted token loss.
        m = loss_mask[:, 1:].float()
        err = F.smooth_l1_loss(next_hidden[:, :-1], feats.final[:, 1:],
                               reduction="none").mean(-1)
        reg = (err * m).sum(-1) / m.sum(-1).clamp_min(1.0)
        return self.regression_weight * reg + self.token_weight * token_loss

    def vllm_config(self) -> dict:
        return {**_llama_fields(self.teacher_config), "architectures": ["LlamaForCausalLM"]}


class Eagle3Drafter(_ChainDrafter):
    """EAGLE-3: ``fc.weight`` [H, n H], ``layers.0.*`` (q/k/v read 2H), ``hidden_norm``,
    ``input_layernorm``, ``norm``, ``lm_head`` (full vocabulary, so no ``d2t``)."""

    kind = "eagle3"

    def __init__(self, teacher_config, aux_layers: tuple[int, ...], steps: int = 3,
                 decay: float = 0.8, lm_head: torch.Tensor | None = None):
        super().__init__(teacher_config, steps, decay)
        h, eps = teacher_config.hidden_size, teacher_config.rms_norm_eps
        last = teacher_config.num_hidden_layers - 1
        # HF's hidden_states[L] is post-norm where vLLM's layer L tap is not: stop at L-1.
        if not aux_layers or any(not 0 < i <= last for i in aux_layers):
            raise ValueError(f"aux layers {tuple(aux_layers)} must lie in 1..{last} "
                             f"for a {last + 1}-layer teacher")
        self.aux_layers = tuple(aux_layers)
        self.fc = nn.Linear(len(aux_layers) * h, h, bias=False)
        self.layers = nn.ModuleList([_DraftLayer(teacher_config, 2 * h, True, True)])
        self.norm = _RMSNorm(h, eps)
        self.lm_head = nn.Linear(h, teacher_config.vocab_size, bias=False)
        if lm_head is not None:
            self.lm_head.weight.data.copy_(lm_head)

    def first_hidden(self, feats):
        return self.fc(feats.aux)

    def layer_input(self, embeds, hidden):
        layer = self.layers[0]
        x = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(hidden)], -1)
        return x, hidden

    def layer_output(self, x, feats):
        return self.norm(x), x

    def lm_head_weight(self, feats):
        return self.lm_head.weight

    def vllm_config(self) -> dict:
        return {**_llama_fields(self.teacher_config),
                "architectures": ["Eagle3LlamaForCausalLM"],
                "draft_vocab_size": self.teacher_config.vocab_size,
                "target_hidden_size": self.teacher_config.hidden_size,
                "eagle_aux_hidden_state_layer_ids": list(self.aux_layers),
                "norm_before_residual": False}


def build_drafter(kind: str, teacher, **options) -> nn.Module:
    """A fresh drafter of ``kind`` for this teacher (HF model)."""
    cfg = teacher.config
    lm_head = teacher.get_output_embeddings().weight.detach()
    if kind == "medusa":
        return MedusaHeads(cfg, lm_head=lm_head, **options)
    if kind == "eagle":
        return EagleDrafter(cfg, **options)
    if kind == "eagle3":
        options.setdefault("aux_layers", default_aux_layers(cfg.num_hidden_layers))
        return Eagle3Drafter(cfg, lm_head=lm_head, **options)
    raise ValueError(f"unknown drafter {kind!r}; choose one of {KINDS}")


def default_aux_layers(num_layers: int) -> tuple[int, ...]:
    """Low, middle and high residual-stream taps, distinct even for a shallow teacher.

    vLLM's own default ``(2, L // 2, L - 3)`` repeats and goes out of order below 6
    layers ((2, 2, 1) for 4), so the export always names its layers.
    """
    if num_layers < 4:
        return tuple(range(1, num_layers))
    return (1, num_layers // 2, num_layers - 1)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
