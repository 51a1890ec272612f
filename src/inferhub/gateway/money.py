"""Money as integer micro-units: prices per million tokens, costs, and decimal input/output.

A request's cost is `ceil((prompt * input_price + completion * output_price) / 1e6)` micro-units,
with prices in micro-units per million tokens. Rounding up keeps the reservation (the same
formula on the largest possible counts) an upper bound of the final cost.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

MICROS = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000


def cost_micros(
    prompt_tokens: int, completion_tokens: int, input_per_mtok: int, output_per_mtok: int
) -> int:
    total = prompt_tokens * input_per_mtok + completion_tokens * output_per_mtok
    return -(-total // TOKENS_PER_PRICE_UNIT)


def parse_amount(text: str) -> int:
    """`"12.5"` currency units -> 12_500_000 micro-units; more than 6 decimals is an error."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation as exc:
        raise ValueError(f"not an amount: {text!r}") from exc
    if not value.is_finite():
        raise ValueError(f"not an amount: {text!r}")
    micros = value * MICROS
    if micros != micros.to_integral_value():
        raise ValueError(f"{text!r} has more than 6 decimal places")
    return int(micros)


def format_amount(micros: int) -> str:
    """12_500_000 -> `"12.500000"`; exact, with six decimals."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS)
    return f"{sign}{whole}.{frac:06d}"
