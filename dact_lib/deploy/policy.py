"""Exit policies as text — ``dact``, ``entropy:S``, ``patience:T``, ``fixed:K`` — parsed without torch.

The one spelling of an exit policy outside a Python session: CLI flags (``--policy``), an exported model's
``config.json`` / manifest, the REST service and the latency budget's choice all use it. ``dact.make_policy`` turns
it into the torch policy object; ``deploy.runtime`` runs it in numpy."""
from __future__ import annotations

import math

from ..errors import ConfigError

POLICY_NAMES = ("dact", "entropy", "patience", "fixed")
_EXAMPLES = "dact, entropy:0.35, patience:2 or fixed:3"


def parse_policy(text: str | None) -> tuple[str, float | int | None]:
    """``"entropy:0.4"`` → ``("entropy", 0.4)``; ``"dact"`` / None / "" → ``("dact", None)``. Checks the value the
    way ``dact.make_policy`` does (fixed depth against the model's layers is checked where the model is known)."""
    if text is None or not str(text).strip():
        return "dact", None
    name, sep, value = str(text).strip().partition(":")
    name = name.strip().lower()
    if name not in POLICY_NAMES:
        raise ConfigError(f"exit policy {text!r}: unknown name {name!r}; write one of {_EXAMPLES}.")
    if name == "dact":
        if sep and value.strip():
            raise ConfigError(f"exit policy {text!r}: the DACT rule takes no value; write just 'dact'.")
        return "dact", None
    if not value.strip():
        raise ConfigError(f"exit policy {text!r}: {name} needs a value after ':', e.g. {_EXAMPLES}.")
    try:
        num = float(value)
    except ValueError:
        raise ConfigError(f"exit policy {text!r}: the value after ':' must be a number, e.g. {_EXAMPLES}.") from None
    if not math.isfinite(num) or num < 0:
        raise ConfigError(f"exit policy {text!r}: the value must be a finite number >= 0.")
    if name == "entropy":
        return "entropy", num
    if not num.is_integer() or num < 1:
        raise ConfigError(f"exit policy {text!r}: {name} needs a whole number >= 1, e.g. {name}:2.")
    return name, int(num)


def format_policy(name: str, value: float | int | None = None) -> str:
    """The text of a policy: ``format_policy(*parse_policy(t))`` is the canonical spelling of ``t``."""
    if name == "dact" or value is None:
        return name
    if name == "entropy":
        return f"entropy:{float(value)!r}"  # every digit: the threshold the evaluate sweep used
    return f"{name}:{int(value)}"


def canonical(text: str | None) -> str:
    return format_policy(*parse_policy(text))
