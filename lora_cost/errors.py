"""The one exception type the CLI turns into a one-line message and exit code 2, and how such a
message quotes what it was given."""


class LoraCostError(ValueError):
    """Bad input: an unknown model, an impossible rank, a malformed file, ..."""


def shown(value: object, limit: int = 40) -> str:
    """A value as an error message may quote it: repr, cut to `limit` characters."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print (sys.get_int_max_str_digits)
        text = f"<integer of about {value.bit_length() * 30103 // 100000} digits>" if isinstance(value, int) else "<value>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
