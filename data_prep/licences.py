"""What a licence string allows: the one home of the rule that the data card, the model card and the publish
gate all apply.

Licences arrive spelled every way: SPDX ids (`CC-BY-NC-4.0`), Hub ids (`cc-by-nc-4.0`), prose (`CC BY-NC 4.0`),
underscores (`cc_by_nc_4.0`). `normalise` folds them to one spelling; `kind` sorts that into the classes a
publisher has to act on.
"""

from __future__ import annotations

import re

PERMISSIVE = "permissive"            # commercial use allowed, attribution at most (Apache-2.0, MIT, CC BY, CC0)
SHARE_ALIKE = "share-alike"          # commercial use allowed, derivatives under the same terms (CC BY-SA, GPL, ODbL)
NON_COMMERCIAL = "non-commercial"    # no commercial use (any CC "NC" variant, research-only terms)
NO_DERIVATIVES = "no-derivatives"    # CC BY-ND: whether a model trained on it is a derivative is for a lawyer to say
CUSTOM = "custom"                    # a model licence with its own use policy (Llama 2/3, Gemma, OpenRAIL)
PROPRIETARY = "proprietary"          # the user's own data: their terms, not a public licence
UNKNOWN = "unknown"                  # "other", "unknown", missing: someone has to read the terms

# Prefixes of normalised ids. Order matters only in that NC is decided first, from the tokens (below).
_KINDS: tuple[tuple[str, str], ...] = (
    ("apache", PERMISSIVE), ("mit", PERMISSIVE), ("bsd", PERMISSIVE), ("isc", PERMISSIVE), ("cc0", PERMISSIVE),
    ("unlicense", PERMISSIVE), ("pddl", PERMISSIVE), ("odc-by", PERMISSIVE), ("zlib", PERMISSIVE), ("ncsa", PERMISSIVE),
    ("cc-by-sa", SHARE_ALIKE), ("cc-by-nd", NO_DERIVATIVES), ("gpl", SHARE_ALIKE), ("agpl", SHARE_ALIKE),
    ("lgpl", SHARE_ALIKE), ("mpl", SHARE_ALIKE), ("odbl", SHARE_ALIKE), ("cc-by", PERMISSIVE),
    ("llama", CUSTOM), ("gemma", CUSTOM), ("openrail", CUSTOM), ("bigscience", CUSTOM), ("creativeml", CUSTOM),
    ("deepseek", CUSTOM), ("qwen", CUSTOM), ("proprietary", PROPRIETARY),
)
# Tokens that mean "no commercial use" wherever they appear: "nc" is a token of every CC NC id; it never matches inside
# a word ("ncsa", the University of Illinois licence, is permissive).
_NC_TOKENS = {"nc", "noncommercial", "non-commercial", "research-only", "academic-only"}


def normalise(licence: str | None) -> str:
    """One spelling: lower case, runs of spaces, underscores and hyphens become one hyphen (`CC BY-NC 4.0`,
    `cc_by_nc_4.0` and `CC-BY-NC-4.0` all become `cc-by-nc-4.0`). Missing becomes `unknown`."""
    if not licence or not str(licence).strip():
        return UNKNOWN
    return re.sub(r"[\s_\-]+", "-", str(licence).strip().lower()).strip("-")


def kind(licence: str | None) -> str:
    """The class of a licence (one of the constants above)."""
    norm = normalise(licence)
    tokens = set(norm.split("-"))
    if tokens & _NC_TOKENS or any(t in norm for t in ("non-commercial", "noncommercial", "research-only")):
        return NON_COMMERCIAL
    if norm in ("other", UNKNOWN, "none", "see-inputs"):
        return UNKNOWN
    for prefix, k in _KINDS:
        if norm.startswith(prefix) and not norm[len(prefix):][:1].isalpha():   # "mit-0", "llama3", not "mitre"
            return k
    return UNKNOWN


def is_non_commercial(licence: str | None) -> bool:
    return kind(licence) == NON_COMMERCIAL
