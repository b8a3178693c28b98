"""Check digits of the identifiers that carry one, so a number that merely has the right shape (a sum in a word
problem, a page range, a citation) is not taken for an id. Each function takes the matched text, separators and
all, and answers whether it is a valid id. The algorithms are the published ones; docs/pii.md names the sources.
"""

from __future__ import annotations

import re

_NON_ALNUM = re.compile(r"[^0-9A-Za-z]")


def compact(text: str) -> str:
    """The id without spaces, dashes, dots or slashes."""
    return _NON_ALNUM.sub("", text)


def luhn(digits: str) -> bool:
    """ISO/IEC 7812 mod 10 (card numbers, IMEI, NPI)."""
    if not digits.isdigit():
        return False
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# Issuer prefixes of the card schemes in use (Visa, Mastercard old and 2-series, Amex, Discover, JCB, Diners,
# UnionPay, Maestro): a Luhn-valid run of digits outside these is more likely a long number than a card.
_CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2(?:2[2-9]|[3-6]\d|7[01]|720)|3[47]|3(?:0[0-5]|[68])|6(?:011|5|4[4-9]|2)|35(?:2[89]|[3-8])|5[06-9]|6[37])")


def card(text: str) -> bool:
    d = compact(text)
    return 13 <= len(d) <= 19 and bool(_CARD_PREFIX.match(d)) and luhn(d)


def nhs(text: str) -> bool:
    """UK NHS number: ten digits, weights 10..2 on the first nine, check = 11 - sum mod 11 (11 -> 0; 10 is never issued)."""
    d = compact(text)
    if len(d) != 10 or not d.isdigit() or len(set(d)) == 1:
        return False
    check = 11 - sum(int(c) * w for c, w in zip(d[:9], range(10, 1, -1))) % 11
    check = 0 if check == 11 else check
    return check != 10 and check == int(d[9])


def nir(text: str) -> bool:
    """French NIR (numéro de sécurité sociale): 13 characters and a 2-digit key = 97 - (number mod 97); Corsica's
    departments 2A and 2B count as 19 and 18 (the INSEE rule)."""
    d = compact(text).upper()
    if len(d) != 15 or not d[13:].isdigit():
        return False
    body = d[:13]
    if body[5:7] == "2A":
        body = body[:5] + "19" + body[7:]
    elif body[5:7] == "2B":
        body = body[:5] + "18" + body[7:]
    if not body.isdigit() or body[0] not in "12":
        return False
    return 97 - int(body) % 97 == int(d[13:])


def iban(text: str) -> bool:
    """ISO 13616: the country code and check digits moved to the end, letters as 10..35, the number mod 97 is 1."""
    d = compact(text).upper()
    if not 15 <= len(d) <= 34 or not d[:2].isalpha() or not d[2:4].isdigit():
        return False
    moved = d[4:] + d[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def ssn(text: str) -> bool:
    """US SSN: no area 000, 666 or 900-999, no group 00, no serial 0000 (the SSA's never-issued ranges)."""
    d = compact(text)
    if len(d) != 9 or not d.isdigit():
        return False
    area, group, serial = d[:3], d[3:5], d[5:]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


_VIN_VALUES = {**{str(i): i for i in range(10)}, **dict(zip("ABCDEFGH", range(1, 9))), **dict(zip("JKLMN", range(1, 6))), "P": 7, "R": 9,
               **dict(zip("STUVWXYZ", range(2, 10)))}
_VIN_WEIGHTS = (8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2)


def vin(text: str) -> bool:
    """ISO 3779 VIN with the North American check digit (position 9: weighted sum mod 11, 10 written X)."""
    d = text.upper()
    if len(d) != 17 or any(c not in _VIN_VALUES for c in d) or d.isdigit() or d.isalpha():
        return False
    r = sum(_VIN_VALUES[c] * w for c, w in zip(d, _VIN_WEIGHTS)) % 11
    return d[8] == ("X" if r == 10 else str(r))


def dea(text: str) -> bool:
    """US DEA registration: two letters, six digits and a check digit = (d1 + d3 + d5 + 2 (d2 + d4 + d6)) mod 10."""
    d = compact(text).upper()
    if len(d) != 9 or not d[2:].isdigit():
        return False
    n = [int(c) for c in d[2:]]
    return (n[0] + n[2] + n[4] + 2 * (n[1] + n[3] + n[5])) % 10 == n[6]


def npi(text: str) -> bool:
    """US National Provider Identifier: ten digits, Luhn over the digits prefixed with 80840 (CMS)."""
    d = compact(text)
    return len(d) == 10 and d.isdigit() and d[0] in "12" and luhn("80840" + d)


def imei(text: str) -> bool:
    d = compact(text)
    return len(d) == 15 and luhn(d)
