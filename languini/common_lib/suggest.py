"""Close-match suggestions for error messages ("did you mean ...?")."""

import difflib


def did_you_mean(word, choices) -> str:
    """Return ` (did you mean 'x'?)` for the closest choice, or an empty string."""
    matches = difflib.get_close_matches(str(word), [str(c) for c in choices], n=2, cutoff=0.6)
    if not matches:
        return ""
    return " (did you mean " + " or ".join(f"'{m}'" for m in matches) + "?)"
