"""bitsandbytes quantizers that also take MoE models' fused 3-D expert weights, registered with
transformers through its public ``register_quantization_config`` / ``register_quantizer``.

``MoetoolBnbConfig`` is a ``BitsAndBytesConfig`` whose ``quant_method`` names one of two
quantizers registered here ("moetool_bnb_4bit", "moetool_bnb_8bit"); they subclass transformers'
bitsandbytes quantizers and override two of the ``HfQuantizer`` methods transformers' loader calls
for each checkpoint tensor: ``param_needs_quantization`` (also say yes to a fused expert weight)
and ``get_quantize_ops`` (an op that quantizes expert weights with moetool.runtime.quant.bnb and hands every
other tensor to bitsandbytes' own op). Nothing of transformers is patched. What to do with an
expert weight is the load's ``claim`` (``moetool.runtime.quant.bnb._ExpertClaim``), carried by the config.

Importing this module imports transformers (about 2 s): only moetool.runtime.quant.bnb's loaders do, and
only when they load.
"""

from __future__ import annotations

from transformers import BitsAndBytesConfig
from transformers.quantizers import get_module_from_name, register_quantization_config, register_quantizer
from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer

METHODS = {4: "moetool_bnb_4bit", 8: "moetool_bnb_8bit"}


class MoetoolBnbConfig(BitsAndBytesConfig):
    """``BitsAndBytesConfig`` for moetool's quantizers; ``claim`` says what to do with fused
    expert weights (None: behave as plain bitsandbytes)."""

    def __init__(self, *args, claim=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.quant_method = METHODS[4 if self.load_in_4bit else 8]
        self._moetool_claim = claim

    def to_dict(self):
        out = super().to_dict()
        out.pop("_moetool_claim", None)  # per-load state, not configuration
        return out


class ExpertsQuantize:
    """A transformers ConversionOps (duck-typed: ``convert(input_dict, model=, missing_keys=)``):
    quantizes fused expert weights through the claim, passes everything else to bitsandbytes'
    own op."""

    def __init__(self, inner, claim):
        self.inner = inner
        self.claim = claim

    def convert(self, input_dict, model=None, missing_keys=None, **kwargs):
        rest = {}
        for key, value in input_dict.items():
            found = _expert_weight(model, key, self.claim) if model is not None else None
            if found is None:
                rest[key] = value
                continue
            module, name = found
            self.claim.take(module, name, value[0] if isinstance(value, list) else value)
            if missing_keys is not None:
                missing_keys.discard(key)
        if not rest:
            return {}
        return self.inner.convert(rest, model=model, missing_keys=missing_keys, **kwargs)

    def __getattr__(self, name):  # reverse_op and friends: bitsandbytes' op answers
        if name in ("inner", "claim"):  # not set yet (copy/unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


def _expert_weight(model, param_name: str, claim):
    if claim is None:
        return None
    try:
        module, name = get_module_from_name(model, param_name)
    except (AttributeError, ValueError):
        return None
    return (module, name) if claim.wants(module, name, param_name) else None


class _ClaimsExperts:
    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        claim = getattr(self.quantization_config, "_moetool_claim", None)
        return _expert_weight(model, param_name, claim) is not None or \
            super().param_needs_quantization(model, param_name, **kwargs)

    def get_quantize_ops(self):
        inner = super().get_quantize_ops()
        claim = getattr(self.quantization_config, "_moetool_claim", None)
        return inner if claim is None else ExpertsQuantize(inner, claim)


class MoetoolBnb4BitQuantizer(_ClaimsExperts, Bnb4BitHfQuantizer):
    """transformers' bitsandbytes 4-bit quantizer, plus the fused experts."""


class MoetoolBnb8BitQuantizer(_ClaimsExperts, Bnb8BitHfQuantizer):
    """transformers' bitsandbytes 8-bit quantizer, plus the fused experts."""


def _register() -> None:
    for bits, quantizer in ((4, MoetoolBnb4BitQuantizer), (8, MoetoolBnb8BitQuantizer)):
        for register, cls in ((register_quantization_config, MoetoolBnbConfig), (register_quantizer, quantizer)):
            try:
                register(METHODS[bits])(cls)
            except ValueError:  # "already registered": this module was imported before
                pass


_register()
