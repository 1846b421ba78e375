"""A tiny stand-in for Dream's remote-code ``modeling_dream.py`` (Dream-org/Dream-v0-*-7B).

Written for sinkdlm's tests from the public file's structure, not copied: Qwen2-shaped layers,
``DreamAttention`` (eager) and ``DreamSdpaAttention`` whose ``forward(hidden_states,
attention_mask, position_ids, past_key_value, output_attentions, use_cache, cache_position,
position_embeddings)`` applies rotary from ``position_embeddings`` and calls SDPA itself with the
caller's (B, 1, L, L) mask and is_causal=False; ``DreamBaseModel`` passes the mask through
unchanged; ``DreamModel`` returns MaskedLMOutput logits.

Also as in the public copies (written for transformers 4.4x): the rotary tables come from
``ROPE_INIT_FUNCTIONS[rope_type]`` ("default" unless the config scales rope) into a
non-persistent ``inv_freq`` buffer; ``_tied_weights_keys`` is a list; ``DreamGenerationConfig``
overrides ``validate(self, is_init=False)``. ``ignore_position_ids=True`` is Fast-dLLM's variant,
whose base model numbers the positions 0..L-1 whatever ``position_ids`` it is given.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


class DreamConfig(PretrainedConfig):
    model_type = "dream_mirror"

    def __init__(
        self,
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        attention_dropout=0.0,
        attn_implementation="sdpa",
        rope_scaling=None,
        ignore_position_ids=False,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.attention_dropout = attention_dropout
        if rope_scaling is not None:
            self.rope_scaling = rope_scaling
        self.ignore_position_ids = ignore_position_ids
        self.use_cache = False
        super().__init__(
            attn_implementation=attn_implementation,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


class DreamRMSNorm(nn.Module):
    def __init__(self, width, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)


class DreamRotaryEmbedding(nn.Module):
    def __init__(self, config, device=None):
        super().__init__()
        scaling = getattr(config, "rope_scaling", None) or {}
        self.rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        self.config = config
        self.rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = self.rope_init_fn(config, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x, position_ids):
        angles = position_ids[..., None].float() * self.inv_freq.float()
        angles = torch.cat((angles, angles), dim=-1)
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(states, groups):
    return states.repeat_interleave(groups, dim=1)


class DreamMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DreamAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.is_causal = False
        self.q_proj = nn.Linear(self.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(
            self.hidden_size, self.num_key_value_heads * self.head_dim, bias=True
        )
        self.v_proj = nn.Linear(
            self.hidden_size, self.num_key_value_heads * self.head_dim, bias=True
        )
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=False)
        self.rotary_emb = DreamRotaryEmbedding(config)

    def _project(self, hidden_states, position_ids, position_embeddings):
        batch, length, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        cos, sin = (
            self.rotary_emb(v, position_ids) if position_embeddings is None else position_embeddings
        )
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        past_key_value=None,
        output_attentions=False,
        use_cache=False,
        cache_position=None,
        position_embeddings=None,
    ):
        batch, length, _ = hidden_states.shape
        q, k, v = self._project(hidden_states, position_ids, position_embeddings)
        scores = q @ k.transpose(2, 3) / self.head_dim**0.5
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + attention_mask
        weights = scores.float().softmax(-1).to(q.dtype)
        out = (weights @ v).transpose(1, 2).reshape(batch, length, self.hidden_size)
        return self.o_proj(out), weights if output_attentions else None, past_key_value


class DreamSdpaAttention(DreamAttention):
    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        past_key_value=None,
        output_attentions=False,
        use_cache=False,
        cache_position=None,
        position_embeddings=None,
    ):
        batch, length, _ = hidden_states.shape
        q, k, v = self._project(hidden_states, position_ids, position_embeddings)
        mask = attention_mask[:, :, :, : k.shape[-2]] if attention_mask is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        out = out.transpose(1, 2).contiguous().view(batch, length, self.hidden_size)
        return self.o_proj(out), None, past_key_value


ATTENTION_CLASSES = {"eager": DreamAttention, "sdpa": DreamSdpaAttention}


class DreamDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = ATTENTION_CLASSES[config._attn_implementation or "sdpa"](config, layer_idx)
        self.mlp = DreamMLP(config)
        self.input_layernorm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        past_key_value=None,
        output_attentions=False,
        use_cache=False,
        cache_position=None,
        position_embeddings=None,
        **kwargs,
    ):
        attn, _, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_value=past_key_value,
            output_attentions=output_attentions,
            use_cache=use_cache,
            cache_position=cache_position,
            position_embeddings=position_embeddings,
        )
        hidden_states = hidden_states + attn
        return (hidden_states + self.mlp(self.post_attention_layernorm(hidden_states)),)


class DreamPreTrainedModel(PreTrainedModel):
    config_class = DreamConfig
    base_model_prefix = "model"
    _no_split_modules = ["DreamDecoderLayer"]
    _supports_sdpa = True


class DreamBaseModel(DreamPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DreamDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = DreamRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache_position=None,
    ):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None or self.config.ignore_position_ids:
            position_ids = torch.arange(
                inputs_embeds.shape[1], device=inputs_embeds.device
            ).unsqueeze(0)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
            )[0]
        return BaseModelOutput(last_hidden_state=self.norm(hidden_states))


class DreamGenerationConfig(GenerationConfig):
    # like Dream's: sets its own fields (GenerationConfig.__init__ is not called) and validates
    def __init__(self, **kwargs):
        self.max_new_tokens = kwargs.pop("max_new_tokens", None)
        self.steps = kwargs.pop("steps", 512)
        self.alg = kwargs.pop("alg", "origin")
        self.mask_token_id = kwargs.pop("mask_token_id", None)
        self.transformers_version = kwargs.pop("transformers_version", None)
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.validate(is_init=True)

    def validate(self, is_init=False):  # the transformers-4.4x signature
        pass


class DreamModel(DreamPreTrainedModel):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def _prepare_generation_config(self, generation_config=None, **kwargs):
        """What Dream's diffusion_generate starts with: its own config, updated by the call."""
        if generation_config is None:
            generation_config = DreamGenerationConfig(mask_token_id=self.config.vocab_size - 1)
        generation_config.update(**kwargs)
        return generation_config

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache_position=None,
        num_logits_to_keep=0,
        **loss_kwargs,
    ):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
        )
        return MaskedLMOutput(logits=self.lm_head(out.last_hidden_state))
