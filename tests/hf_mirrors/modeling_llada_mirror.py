"""A tiny stand-in for LLaDA's remote-code ``modeling_llada.py`` (GSAI-ML/LLaDA-8B-*).

Written for sinkdlm's tests from the public file's structure, not copied: the same module tree
(``model.transformer.{wte, emb_drop, blocks, ln_f, ff_out}``), the same ``LLaDALlamaBlock`` with
``attention(q, k, v, attention_bias, layer_past, use_cache, replace_position)`` applying rotary
itself (positions 0..T-1 from the length, no position_ids), and the same pre-transformers-5
interfaces: no ``post_init`` call, ``tie_weights(self)``, no ``use_cache`` in the config.

What the public copies add, reproduced here:
- padding (dLLM's copy): the model turns a (B, L) ``attention_mask`` into an additive
  ``attention_bias`` (B, 1, L, L) (a zero bidirectional bias plus a large negative number on
  padded keys) that every block hands to ``attention``, which passes it to SDPA;
- OLMo-style activation checkpointing: a per-block ``_activation_checkpoint_fn`` (``fine_grained``)
  and a model-level one that ``whole_layer`` / ``one_in_N`` wrap whole blocks in, always set on the
  model; ``gradient_checkpointing_enable()`` selects ``whole_layer`` (dLLM);
- Fast-dLLM's ``replace_position=`` keyword (its KV cache), passed by every block to ``attention``.
Self-contained so it can be loaded with trust_remote_code from a checkpoint directory.
"""

from enum import Enum
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class LLaDAConfig(PretrainedConfig):
    model_type = "llada_mirror"

    def __init__(
        self,
        vocab_size=128,
        d_model=32,
        n_heads=4,
        n_kv_heads=2,
        n_layers=2,
        mlp_hidden_size=64,
        rope=True,
        rope_theta=10000.0,
        rope_full_precision=True,
        include_bias=False,
        weight_tying=False,
        input_emb_norm=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.effective_n_kv_heads = n_kv_heads
        self.n_layers = n_layers
        self.mlp_hidden_size = mlp_hidden_size
        self.rope = rope
        self.rope_theta = rope_theta
        self.rope_full_precision = rope_full_precision
        self.include_bias = include_bias
        self.weight_tying = weight_tying
        self.input_emb_norm = input_emb_norm
        self.attention_dropout = 0.0
        super().__init__(**kwargs)


class ActivationCheckpointingStrategy(Enum):
    whole_layer = "whole_layer"
    one_in_two = "one_in_two"
    one_in_three = "one_in_three"
    one_in_four = "one_in_four"
    fine_grained = "fine_grained"


EVERY_NTH_BLOCK = {
    ActivationCheckpointingStrategy.whole_layer: 1,
    ActivationCheckpointingStrategy.one_in_two: 2,
    ActivationCheckpointingStrategy.one_in_three: 3,
    ActivationCheckpointingStrategy.one_in_four: 4,
}


def activation_checkpoint_function(config):
    return partial(checkpoint, preserve_rng_state=True, use_reentrant=False)


class RMSNorm(nn.Module):
    def __init__(self, width, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """LLaDA-style: tables from the sequence length; queries sit at the last positions."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def get_rotary_embedding(self, seq_len, device):
        dim = self.config.d_model // self.config.n_heads
        inv_freq = 1.0 / (
            self.config.rope_theta
            ** (torch.arange(0, dim, 2, device=device, dtype=torch.float) / dim)
        )
        angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.sin()[None, None], angles.cos()[None, None]

    def rotate_half(self, x):
        first, second = x.chunk(2, dim=-1)
        return torch.cat((-second, first), dim=-1)

    def apply_rotary_pos_emb(self, pos_sin, pos_cos, t):
        return (t * pos_cos + self.rotate_half(t) * pos_sin).to(t.dtype)

    def forward(self, q, k):
        q_, k_ = (q.float(), k.float()) if self.config.rope_full_precision else (q, k)
        query_len, key_len = q_.shape[-2], k_.shape[-2]
        pos_sin, pos_cos = self.get_rotary_embedding(key_len, q_.device)
        pos_sin, pos_cos = pos_sin.type_as(q_), pos_cos.type_as(q_)
        q_ = self.apply_rotary_pos_emb(
            pos_sin[:, :, key_len - query_len : key_len],
            pos_cos[:, :, key_len - query_len : key_len],
            q_,
        )
        k_ = self.apply_rotary_pos_emb(pos_sin, pos_cos, k_)
        return q_.type_as(q), k_.type_as(k)


class LLaDALlamaBlock(nn.Module):
    def __init__(self, layer_id, config):
        super().__init__()
        self.layer_id = layer_id
        self.config = config
        head_dim = config.d_model // config.n_heads
        bias = config.include_bias
        self.attn_norm = RMSNorm(config.d_model)
        self.ff_norm = RMSNorm(config.d_model)
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=bias)
        self.k_proj = nn.Linear(config.d_model, config.effective_n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(config.d_model, config.effective_n_kv_heads * head_dim, bias=bias)
        self.attn_out = nn.Linear(config.d_model, config.d_model, bias=bias)
        self.ff_proj = nn.Linear(config.d_model, config.mlp_hidden_size, bias=bias)
        self.up_proj = nn.Linear(config.d_model, config.mlp_hidden_size, bias=bias)
        self.ff_out = nn.Linear(config.mlp_hidden_size, config.d_model, bias=bias)
        self.rotary_emb = RotaryEmbedding(config)
        self.q_norm = self.k_norm = None
        self._activation_checkpoint_fn = None

    def set_activation_checkpointing(self, strategy):
        fine_grained = strategy == ActivationCheckpointingStrategy.fine_grained
        self._activation_checkpoint_fn = (
            activation_checkpoint_function(self.config) if fine_grained else None
        )

    def _scaled_dot_product_attention(
        self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False
    ):
        groups = q.size(1) // k.size(1)
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        # bidirectional: the only mask is the padding bias, if any
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=False
        )

    def attention(
        self, q, k, v, attention_bias=None, layer_past=None, use_cache=False, replace_position=None
    ):
        batch, length, width = q.shape
        head_dim = width // self.config.n_heads
        q = q.view(batch, length, self.config.n_heads, head_dim).transpose(1, 2)
        k = k.view(batch, length, self.config.effective_n_kv_heads, head_dim).transpose(1, 2)
        v = v.view(batch, length, self.config.effective_n_kv_heads, head_dim).transpose(1, 2)
        if layer_past is not None:
            if replace_position is None:
                k = torch.cat((layer_past[0], k), dim=-2)
                v = torch.cat((layer_past[1], v), dim=-2)
            else:  # Fast-dLLM: (B, L_cache) 0/1, the cached positions these tokens overwrite
                where = replace_position.nonzero(as_tuple=True)[1]
                past_k, past_v = layer_past[0].clone(), layer_past[1].clone()
                past_k[:, :, where], past_v[:, :, where] = k, v
                k, v = past_k, past_v
        present = (k, v) if use_cache else None
        query_len, key_len = q.shape[-2], k.shape[-2]
        if self.config.rope:
            q, k = self.rotary_emb(q, k)
        if attention_bias is not None:
            attention_bias = attention_bias[:, :, key_len - query_len : key_len, :key_len].to(
                q.dtype
            )
        out = self._scaled_dot_product_attention(q, k, v, attn_mask=attention_bias)
        out = out.transpose(1, 2).contiguous().view(batch, length, width)
        return self.attn_out(out), present

    def _maybe_checkpointed(self, fn, *args, **kwargs):
        if self._activation_checkpoint_fn is not None:
            return self._activation_checkpoint_fn(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    def forward(
        self, x, attention_bias=None, layer_past=None, use_cache=False, replace_position=None
    ):
        normed = self._maybe_checkpointed(self.attn_norm, x)
        att, cache = self._maybe_checkpointed(
            self.attention,
            self.q_proj(normed),
            self.k_proj(normed),
            self.v_proj(normed),
            attention_bias,
            layer_past=layer_past,
            use_cache=use_cache,
            replace_position=replace_position,
        )
        x = x + att
        normed = self._maybe_checkpointed(self.ff_norm, x)
        x = x + self.ff_out(F.silu(self.ff_proj(normed)) * self.up_proj(normed))
        return x, cache


class LLaDAOutput(NamedTuple):
    logits: torch.Tensor
    attn_key_values: list | None
    hidden_states: tuple | None


class LLaDAModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.d_model),
                emb_drop=nn.Dropout(0.0),
                ln_f=RMSNorm(config.d_model),
                blocks=nn.ModuleList(LLaDALlamaBlock(i, config) for i in range(config.n_layers)),
            )
        )
        if not config.weight_tying:
            self.transformer.update(
                {"ff_out": nn.Linear(config.d_model, config.vocab_size, bias=False)}
            )
        self.activation_checkpointing_strategy = None
        self._activation_checkpoint_fn = activation_checkpoint_function(config)  # always set
        self.gradient_checkpointing = False

    def set_activation_checkpointing(self, strategy):
        self.activation_checkpointing_strategy = strategy
        for block in self.transformer.blocks:
            block.set_activation_checkpointing(strategy)

    def _padding_bias(self, attention_mask, attention_bias, batch, length, device):
        """dLLM: (B, L) 1 = real -> additive (B, 1, L, L), merged with the (bidirectional) bias."""
        if attention_mask is not None and 0.0 in attention_mask:
            keep = attention_mask.to(torch.float).view(batch, -1)[:, None, None, :]
            attention_mask = (1.0 - keep) * torch.finfo(keep.dtype).min
        else:
            attention_mask = None
        if attention_bias is None and attention_mask is None:
            return None
        if attention_bias is None:
            attention_bias = torch.zeros(1, 1, length, length, device=device)
        elif attention_bias.dtype in (torch.int8, torch.bool):
            attention_bias = attention_bias.to(torch.float)
            attention_bias.masked_fill_(attention_bias == 0.0, torch.finfo(torch.float).min)
        attention_bias = attention_bias[:, :, :length, :length].to(torch.float)
        if attention_mask is not None:
            attention_bias = attention_bias + attention_mask
            attention_bias.masked_fill_(
                attention_bias == float("-inf"), torch.finfo(attention_bias.dtype).min
            )
        return attention_bias

    def forward(
        self,
        input_ids,
        input_embeddings=None,
        attention_mask=None,
        attention_bias=None,
        past_key_values=None,
        use_cache=False,
        last_logits_only=False,
        output_hidden_states=None,
        replace_position=None,
    ):
        x = self.transformer.wte(input_ids) if input_embeddings is None else input_embeddings
        batch, length = x.shape[:2]
        if self.config.input_emb_norm:
            x = x * self.config.d_model**0.5
        x = self.transformer.emb_drop(x)
        attention_bias = self._padding_bias(attention_mask, attention_bias, batch, length, x.device)
        caches = [] if use_cache else None
        every = EVERY_NTH_BLOCK.get(self.activation_checkpointing_strategy)
        for i, block in enumerate(self.transformer.blocks):
            past = None if past_key_values is None else past_key_values[i]
            kwargs = dict(
                attention_bias=attention_bias,
                layer_past=past,
                use_cache=use_cache,
                replace_position=replace_position,
            )
            if every is not None and i % every == 0:
                x, cache = self._activation_checkpoint_fn(block, x, **kwargs)
            else:
                x, cache = block(x, **kwargs)
            if use_cache:
                caches.append(cache)
        x = self.transformer.ln_f(x)
        if self.config.weight_tying:
            logits = F.linear(x, self.transformer.wte.weight)
        else:
            logits = self.transformer.ff_out(x)
        return LLaDAOutput(logits=logits, attn_key_values=caches, hidden_states=None)


class LLaDAModelLM(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDALlamaBlock"]
    supports_gradient_checkpointing = True

    def __init__(self, config, model=None, init_params=False):
        super().__init__(config)
        self.model = model or LLaDAModel(config)  # note: no self.post_init(), as in LLaDA

    def forward(
        self,
        input_ids=None,
        inputs_embeds=None,
        attention_mask=None,
        attention_bias=None,
        past_key_values=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache_position=None,
        replace_position=None,
    ):
        if use_cache is None:
            use_cache = self.config.use_cache  # LLaDAConfig defines no use_cache
        out = self.model.forward(
            input_ids=input_ids,
            input_embeddings=inputs_embeds,
            attention_mask=attention_mask,
            attention_bias=attention_bias,
            past_key_values=past_key_values,
            use_cache=use_cache,
            replace_position=replace_position,
        )
        return CausalLMOutputWithPast(logits=out.logits, past_key_values=out.attn_key_values)

    def _set_gradient_checkpointing(self, enable=True, gradient_checkpointing_func=None, **kwargs):
        # dLLM: transformers' gradient_checkpointing_enable() turns on LLaDA's own whole_layer
        # strategy (its model-level _activation_checkpoint_fn), not gradient_checkpointing_func
        self.model._gradient_checkpointing_func = gradient_checkpointing_func or checkpoint
        self.model.gradient_checkpointing = enable
        self.model.set_activation_checkpointing(
            ActivationCheckpointingStrategy.whole_layer if enable else None
        )

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def set_input_embeddings(self, value):
        self.model.transformer.wte = value

    def get_output_embeddings(self):
        return None if self.config.weight_tying else self.model.transformer.ff_out

    def tie_weights(self):  # the pre-transformers-5 signature
        if self.config.weight_tying:
            self.model.transformer.ff_out = self.model.transformer.wte
