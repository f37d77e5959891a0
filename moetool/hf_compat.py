"""Every place moetool touches transformers' or accelerate's internals, in one module.

Version note: written against transformers 5.24 and accelerate 1.16 (the versions in
requirements.lock); what pyproject.toml allows is what `make test-lowest` / `make test-latest`
run the suite against. Each function says what it relies on and what it does when that is gone.
Importing this module is cheap (transformers is imported inside the functions).
"""

from __future__ import annotations


def default_skip_modules(model) -> list[str]:
    """The modules transformers' bitsandbytes integration leaves unquantized by default (the
    output embedding, tied weights, the last module). Passing ``llm_int8_skip_modules`` replaces
    that default, so whoever extends the list starts from this.

    Relies on ``get_keys_to_not_convert`` (``transformers.quantizers.base`` in 5.2x,
    ``transformers.integrations.bitsandbytes`` before); without it: the output embedding's name."""
    fn = None
    try:
        from transformers.quantizers.base import get_keys_to_not_convert as fn
    except ImportError:
        try:
            from transformers.integrations.bitsandbytes import get_keys_to_not_convert as fn
        except ImportError:
            fn = None
    if fn is not None:
        try:
            return sorted(set(fn(model)))
        except (AttributeError, TypeError, IndexError):
            pass
    out = model.get_output_embeddings()
    return sorted(name for name, module in model.named_modules() if out is not None and module is out)
