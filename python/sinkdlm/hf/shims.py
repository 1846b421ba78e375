"""sinkdlm.hf.from_pretrained: load a (possibly remote-code) DLM under transformers 5 and restore
its sink token.

LLaDA's remote code predates transformers 5: its model never calls ``post_init`` (so
``all_tied_weights_keys`` is missing), its ``tie_weights(self)`` takes none of the arguments
transformers now passes, and its config has no ``use_cache``. The shims below patch exactly those
gaps, detected by feature rather than by name, on remote-code classes only.
"""

import functools
import inspect

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


def _shim_model_class(cls):
    """Makes an old remote-code PreTrainedModel subclass loadable by transformers 5 (idempotent)."""
    if cls.__dict__.get("_sinkdlm_shimmed"):
        return cls
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
        if "all_tied_weights_keys" not in self.__dict__:
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


def _load_quietly(cls, path, config, kwargs):
    """cls.from_pretrained, without reporting the sink embedding as an unexpected key (it is
    restored right after by add_sink_token)."""
    had = "_keys_to_ignore_on_load_unexpected" in cls.__dict__
    previous = cls.__dict__.get("_keys_to_ignore_on_load_unexpected")
    inherited = getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or set()
    pattern = r"(^|\.)sink_embedding\.weight$"
    # transformers 5 keeps these patterns in a set, older versions in a list
    cls._keys_to_ignore_on_load_unexpected = (
        [*inherited, pattern] if isinstance(inherited, list) else {*inherited, pattern}
    )
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

    When ``config.sinkdlm`` is present the model gets ``add_sink_token`` with the recorded
    sink_position and the saved sink embedding, so the result equals the saved model.
    """
    from transformers import AutoConfig

    from .patch import add_sink_token

    hub = {k: kwargs[k] for k in _HUB_KEYS if k in kwargs}
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path, **hub)
    _shim_config(config)
    cls = model_class or _resolve_class(config, path, hub)
    if model_class is not None and not cls.__module__.startswith("transformers."):
        _shim_model_class(cls)
    model = _load_quietly(cls, path, config, kwargs)
    recorded = getattr(model.config, "sinkdlm", None)
    if isinstance(recorded, dict):
        add_sink_token(model, sink_position=recorded["sink_position"])
    return model
