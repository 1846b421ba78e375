"""sinkdlm.hf.from_pretrained: load a (possibly remote-code) DLM under transformers 4.57 or 5 and
restore its sink token.

LLaDA's and Dream's remote code predate transformers 5. LLaDA's model never calls ``post_init``
(so ``all_tied_weights_keys`` is missing), its ``tie_weights(self)`` takes none of the arguments
transformers now passes, and its config has no ``use_cache``. Dream looks up
``ROPE_INIT_FUNCTIONS["default"]`` (removed in 5), lists its ``_tied_weights_keys`` (5 wants a
``{target: source}`` dict) and overrides ``GenerationConfig.validate`` with fewer keywords than 5
passes. The shims below patch exactly those gaps, detected by feature rather than by name, on
remote-code classes only.

Whatever the architecture, a model is built on the meta device and its weights loaded; buffers
that are not in the checkpoint (non-persistent ones, such as rotary ``inv_freq``) are re-created
by transformers only for the classes it knows, and remote code's are left uninitialised memory.
``restore_non_persistent_buffers`` therefore rebuilds every one from the model's constructor.
"""

import contextlib
import copy
import functools
import inspect
import sys

import torch

_HUB_KEYS = (
    "trust_remote_code",
    "revision",
    "cache_dir",
    "token",
    "local_files_only",
    "force_download",
    "code_revision",
)


def _shim_config(config):
    if not hasattr(config, "use_cache"):
        config.use_cache = False
    return config


def _default_rope_parameters(config=None, device=None, seq_len=None, **legacy):
    """Plain rotary frequencies, (inv_freq (head_dim * partial_rotary_factor / 2,), scaling 1.0):
    the "default" entry transformers 4 had in ROPE_INIT_FUNCTIONS."""
    if config is None:
        base, dim = legacy["base"], legacy["dim"]
    else:
        base = getattr(config, "rope_theta", None)
        if base is None:
            base = (getattr(config, "rope_parameters", None) or {})["rope_theta"]
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float)
    return 1.0 / (base ** (exponents / dim)), 1.0


@contextlib.contextmanager
def remote_code_compat():
    """While active, remote code written for transformers 4 can be constructed under 5: the
    ``ROPE_INIT_FUNCTIONS["default"]`` entry it looks up exists (and is removed again on exit)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    added = "default" not in ROPE_INIT_FUNCTIONS
    if added:
        ROPE_INIT_FUNCTIONS["default"] = _default_rope_parameters
    try:
        yield
    finally:
        if added:
            ROPE_INIT_FUNCTIONS.pop("default", None)


def _shim_generation_configs(module):
    """Remote-code GenerationConfig subclasses whose ``validate`` takes fewer keywords than
    transformers passes (``strict=``, ``user_set_attributes=``): the extra ones are dropped."""
    from transformers import GenerationConfig

    for obj in list(vars(module).values()) if module is not None else []:
        if not (
            isinstance(obj, type)
            and issubclass(obj, GenerationConfig)
            and "validate" in obj.__dict__
            and not obj.__module__.startswith("transformers.")
            and not obj.__dict__.get("_sinkdlm_shimmed")
        ):
            continue
        validate = obj.__dict__["validate"]
        params = inspect.signature(validate).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue

        @functools.wraps(validate)
        def shimmed(self, *args, _validate=validate, _params=params, **kwargs):
            return _validate(self, *args, **{k: v for k, v in kwargs.items() if k in _params})

        obj.validate = shimmed
        obj._sinkdlm_shimmed = True


def _transformers_5():
    from transformers import PreTrainedModel

    return hasattr(PreTrainedModel, "get_expanded_tied_weights_keys")


def _tie_listed_weights(model, targets):
    """transformers-4 style ``_tied_weights_keys = [target, ...]`` (each tied to the input
    embedding) as the ``{target: source}`` mapping transformers 5 reads."""
    weight = model.get_input_embeddings().weight
    source = next(name for name, p in model.named_parameters() if p is weight)
    model._tied_weights_keys = {target: source for target in targets}
    model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=False)


def _shim_model_class(cls):
    """Makes an old remote-code PreTrainedModel subclass loadable by transformers 5 (idempotent)."""
    if cls.__dict__.get("_sinkdlm_shimmed"):
        return cls
    _shim_generation_configs(sys.modules.get(cls.__module__))
    listed = getattr(cls, "_tied_weights_keys", None)
    if isinstance(listed, (list, tuple)) and _transformers_5():
        cls._sinkdlm_tied_targets = tuple(listed)
        cls._tied_weights_keys = None  # post_init (inside __init__) must not read the list
    tie = getattr(cls, "tie_weights", None)
    if tie is not None:
        params = inspect.signature(tie).parameters
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        if not takes_kwargs and "missing_keys" not in params:

            @functools.wraps(tie)
            def tie_weights(self, *args, **kwargs):
                return tie(self)

            cls.tie_weights = tie_weights

    original_init = cls.__init__

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        targets = getattr(type(self), "_sinkdlm_tied_targets", None)
        if targets:
            _tie_listed_weights(self, targets)
        elif "all_tied_weights_keys" not in self.__dict__:
            expand = getattr(self, "get_expanded_tied_weights_keys", None)
            try:
                keys = expand(all_submodels=False) if expand is not None else {}
            except Exception:  # an old model without the metadata this needs ties nothing
                keys = {}
            self.all_tied_weights_keys = keys

    cls.__init__ = __init__
    cls._sinkdlm_shimmed = True
    return cls


def _resolve_class(config, path, hub):
    import transformers
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        raise ValueError(f"{path}: config.json names no architectures; pass model_class=")
    arch = architectures[0]
    auto_map = getattr(config, "auto_map", None) or {}
    for reference in auto_map.values():
        reference = reference[0] if isinstance(reference, (list, tuple)) else reference
        if reference and reference.split(".")[-1] == arch:
            if not hub.get("trust_remote_code"):
                raise ValueError(
                    f"{path} uses remote code ({reference}); pass trust_remote_code=True to load it"
                )
            return _shim_model_class(get_class_from_dynamic_module(reference, path, **hub))
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise ValueError(f"{path}: architecture {arch} is neither in transformers nor in auto_map")
    return cls


@contextlib.contextmanager
def _default_dtype(dtype):
    previous = torch.get_default_dtype()
    if dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def restore_non_persistent_buffers(model, cls=None):
    """Rebuilds every non-persistent buffer of ``model`` from its constructor; returns the names
    of those whose loaded values were wrong (and are now fixed).

    The reference is ``cls(config)`` built with parameters on the meta device (nothing the size of
    the weights is allocated) under the model's dtype as the default, as from_pretrained builds
    it. Raises RuntimeError when the constructor does not give a buffer of the same shape.
    """
    from accelerate import init_empty_weights

    cls = cls or type(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    with remote_code_compat(), init_empty_weights(include_buffers=False), _default_dtype(dtype):
        reference = cls(copy.deepcopy(model.config))
    fixed = []
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for name in sorted(module._non_persistent_buffers_set):
                loaded = module._buffers.get(name)
                if loaded is None:
                    continue
                full = f"{module_name}.{name}" if module_name else name
                try:
                    want = reference.get_buffer(full)
                except AttributeError:
                    want = None
                if want is None or want.is_meta or want.shape != loaded.shape:
                    raise RuntimeError(
                        f"{cls.__name__}: cannot rebuild the non-persistent buffer {full} "
                        f"{tuple(loaded.shape)} from the constructor (it gave "
                        f"{None if want is None else tuple(want.shape)}); the loaded model may "
                        "hold uninitialised values there"
                    )
                want = want.to(device=loaded.device, dtype=loaded.dtype)
                if not torch.equal(loaded, want):
                    loaded.copy_(want)
                    fixed.append(full)
    return fixed


def _load_quietly(cls, path, config, kwargs):
    """cls.from_pretrained, without reporting the sink embedding as an unexpected key (it is
    restored right after by add_sink_token)."""
    had = "_keys_to_ignore_on_load_unexpected" in cls.__dict__
    previous = cls.__dict__.get("_keys_to_ignore_on_load_unexpected")
    inherited = getattr(cls, "_keys_to_ignore_on_load_unexpected", None)
    pattern = r"(^|\.)sink_embedding\.weight$"
    # transformers 5 keeps these patterns in a set, 4.x in a list
    if isinstance(inherited, list) or (inherited is None and not _transformers_5()):
        cls._keys_to_ignore_on_load_unexpected = [*(inherited or []), pattern]
    else:
        cls._keys_to_ignore_on_load_unexpected = {*(inherited or set()), pattern}
    try:
        return cls.from_pretrained(path, config=config, **kwargs)
    finally:
        if had:
            cls._keys_to_ignore_on_load_unexpected = previous
        else:
            del cls._keys_to_ignore_on_load_unexpected


def from_pretrained(path, *, model_class=None, **kwargs):
    """Loads a model saved with or without the sink token; returns it patched if it had one.

    Args:
        path: local directory or hub id (anything ``PreTrainedModel.from_pretrained`` takes).
        model_class: class to load with; default: ``config.architectures[0]`` from transformers, or
            the remote-code class from ``config.auto_map`` (needs ``trust_remote_code=True``).
        **kwargs: passed to ``from_pretrained`` (dtype, device_map, trust_remote_code, ...).

    Non-persistent buffers (rotary tables) are rebuilt from the constructor
    (:func:`restore_non_persistent_buffers`), so the result computes what a freshly constructed
    model with the same weights computes. When ``config.sinkdlm`` is present the model gets
    ``add_sink_token`` with the recorded sink_position and the saved sink embedding, so the result
    equals the saved model.
    """
    from transformers import AutoConfig

    from .patch import add_sink_token

    hub = {k: kwargs[k] for k in _HUB_KEYS if k in kwargs}
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path, **hub)
    _shim_config(config)
    cls = model_class or _resolve_class(config, path, hub)
    if model_class is not None and not cls.__module__.startswith("transformers."):
        _shim_model_class(cls)
    with remote_code_compat():
        model = _load_quietly(cls, path, config, kwargs)
    restore_non_persistent_buffers(model, cls)
    recorded = getattr(model.config, "sinkdlm", None)
    if isinstance(recorded, dict):
        add_sink_token(model, sink_position=recorded["sink_position"])
    return model
