"""Personal names: after a title (Mrs. Siobhan O'Hara), after a label (Patient: JOHN SMITH, /s/ Jane Roe) or a role
word (the defendant Marc Dubois), then every later use of one of the found name's parts in the same text (O'Hara
alone, three sentences on). A name part is a capitalised word with apostrophes, hyphens, inner capitals and
diacritics (O'Hara, Jean-Luc, McDonald, Ngũgĩ, Żółkiewski), or an initial; particles (van der, de la, bin, d')
join parts. Bare names with no title, label or role are left to named-entity recognition (ner.py).
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

# Uppercase letters Python's `re` cannot name by property: ASCII, Latin-1 and the Latin Extended-A capitals of
# the European languages medical and legal data comes in.
_UP = "A-ZÀ-ÖØ-ÞĀĂĄĆĈĊČĎĐĒĔĖĘĚĜĞĠĢĤĦĨĪĬĮİĲĴĶĹĻĽĿŁŃŅŇŊŌŎŐŒŔŖŘŚŜŞŠŢŤŦŨŪŬŮŰŲŴŶŸŹŻŽ"
_LOW = "a-zß-öø-ÿā-žƀ-ɏḀ-ỿ"
_WORD = rf"[{_UP}](?:[{_LOW}]+(?:[{_UP}][{_LOW}]+)?|[{_UP}]+)"  # Smith, McDonald, SMITH
# O'Hara, D'Angelo, Jean-Luc, Smith-Jones; an initial (J. or J); all of it one part
_PART = rf"(?:[{_UP}][’']|[dl][’'])?{_WORD}(?:[-’'][{_UP}]?[{_LOW}]+)*|[{_UP}]\.?(?=\s)"
_PARTICLE = r"(?:van|von|der|den|de|del|della|degli|di|da|du|des|la|le|ter|ten|bin|ibn|bint|al|el|dos|das|do|y|zu|af|av|mac)"
NAME = rf"(?:{_PART})(?:[ \t]+(?:{_PARTICLE}[ \t]+)*(?:{_PART})){{0,4}}"

# Titles, case-sensitive so "dr" in a word or "miss" the verb do not count; the period is optional (Dr Smith).
# ("Fr" is left out: in medicine it is the French catheter gauge, "8 Fr Wolf".)
_TITLES = "Mr|Mrs|Ms|Mx|Mme|Mlle|Madame|Monsieur|Dr|Prof|Sir|Dame|Rev|Reverend|Sgt|Sergeant|Det|Capt|Hon|Herr|Frau|Señor|Señora|Sra|Srta"
# Titles that are also ordinary words ("Will We Miss Cancers", "Research Nurse"): they count only when the word
# before them is not capitalised, so Title Case headings and job titles are left alone.
_WORDLIKE = "Miss|Doctor|Professor|Judge|Justice|Lady|Lord|Father|Sister|Nurse|Officer|Detective|Captain"
_TITLED = re.compile(rf"(?<![\w.])(?P<t>{_TITLES}|{_WORDLIKE})\.?[ \t]+(?P<v>{NAME})")
_WORDLIKE_SET = set(_WORDLIKE.split("|"))
_CAPITALISED_BEFORE = re.compile(rf"[{_UP}][{_LOW}]*[ \t]+$")
TITLES = f"{_TITLES}|{_WORDLIKE}"
TITLE_NEEDS = tuple(dict.fromkeys(t[:3] if len(t) > 3 else t for t in TITLES.split("|")))
# Labels in any case, then a colon or a spaced dash: "Patient: ...", "SIGNED - ...", and "/s/ ..." (an
# e-signature in filings). "Patient-Controlled" is not a label.
LABELS = ("patient(?: name)?|name|full name|client|plaintiff|defendant|claimant|witness|signed|signature|signed by|petitioner|respondent|"
          "appellant|appellee|applicant|guardian|next of kin|emergency contact|attending(?: physician)?|physician|surgeon|provider|"
          "referring physician|referred by|nurse|caregiver|parent|mother|father|spouse|employee|tenant|landlord|decedent|victim|"
          "nom|prénom|patient\\(e\\)|médecin")
LABEL_NEEDS = ("patient", "name", "nom", "client", "plaintiff", "defendant", "claimant", "witness", "sign", "petitioner", "respondent", "appel",
               "applicant", "guardian", "kin", "contact", "attending", "physician", "surgeon", "provider", "refer", "nurse", "caregiver",
               "parent", "mother", "father", "spouse", "employee", "tenant", "landlord", "decedent", "victim", "médecin", "/s/")
_LABELLED = re.compile(rf"(?i:(?<![\w])(?:{LABELS}))(?:[ \t]*:[ \t]*|[ \t]+[-–][ \t]+)(?P<v>{NAME})|/s/[ \t]*(?P<s>{NAME})")
# Role words (lower case: "Patient Health Questionnaire" is a title) before a capitalised name in running text:
# "the defendant, Marc Dubois, ..." / "patient Maria Lopez".
_ROLES = ("patient|client|plaintiff|defendant|claimant|witness|petitioner|respondent|appellant|decedent|victim|testator|"
          "tenant|landlord|employee|applicant|resident")
ROLE_NEEDS = tuple(_ROLES.split("|"))
_ROLED = re.compile(rf"(?<![\w])(?:{_ROLES}),?[ \t]+(?P<v>{NAME})")

# Capitalised words that start sentences or headings and are never a name part here: a match is cut before them.
_STOP = set("""A An And The In On At Of For To From By With Without But Or Nor If When While After Before Since Until As He She They We You
I It Its His Her Their Our This That These Those There Here Who Whom Whose What Which Where Why How Is Was Were Are Be Been Has Have Had Do
Does Did Not No Yes Patient Client Name Plaintiff Defendant Witness Court Section Case Page Table Figure Note Date DOB MRN Age Sex
Male Female Signed Dear Re Subject Date Tel Phone Fax Email Address Mr Mrs Ms Dr Prof Judge Justice January February March
July August September October November December Monday Tuesday Wednesday Thursday Friday Saturday Sunday Hospital Clinic Street Road
Avenue Inc Ltd LLC Corp Company Department State United States Both All Each Every Some Most Many Few Several Other""".split())
_PARTICLES = set(_PARTICLE.strip("(?:)").split("|"))


def _trim(text: str, s: int, e: int) -> tuple[int, int] | None:
    """The span cut before its first stop word ("Judge Smith In the ..." keeps "Smith"); None when nothing is left."""
    end = None
    for w in re.finditer(r"\S+", text[s:e]):
        if w.group(0).rstrip(".,") in _STOP:
            break
        end = s + w.end()
    return (s, end) if end is not None else None


def _find(pattern: re.Pattern, text: str) -> Iterator[tuple[int, int]]:
    for m in pattern.finditer(text):
        g = "v" if m.start("v") >= 0 else "s"
        span = _trim(text, m.start(g), m.end(g))
        if span:
            yield span


def titled(text: str) -> Iterator[tuple[int, int]]:
    """Names after a title; a word-like title counts only when the word before it is not capitalised."""
    for m in _TITLED.finditer(text):
        if m.group("t") in _WORDLIKE_SET and _CAPITALISED_BEFORE.search(text, max(0, m.start() - 40), m.start()):
            continue
        span = _trim(text, m.start("v"), m.end("v"))
        if span:
            yield span


def labelled(text: str) -> Iterator[tuple[int, int]]:
    """Names after a label and a colon or dash, or after /s/."""
    return _find(_LABELLED, text)


def after_role(text: str) -> Iterator[tuple[int, int]]:
    """Names after a role word in running text."""
    return _find(_ROLED, text)


def parts_to_follow(value: str) -> list[str]:
    """The parts of a found name worth finding alone later in the text (no initials, particles or stop words)."""
    out = []
    for p in re.split(r"[ \t]+", value):
        p = p.strip(".,")
        if len(p) >= 2 and p.lower() not in _PARTICLES and p not in _STOP and not re.fullmatch(rf"[{_UP}]\.?", p):
            out.append(p)
    return out


def follow(text: str, values: Iterable[str]) -> Iterator[tuple[int, int, str]]:
    """Later standalone uses of the parts of found names: (start, end, the part)."""
    parts = sorted({p for v in values for p in parts_to_follow(v)}, key=len, reverse=True)
    if not parts:
        return
    pattern = re.compile(r"(?<![\w'’-])(?:" + "|".join(re.escape(p) for p in parts) + r")(?![\w'’-])")
    for m in pattern.finditer(text):
        yield m.start(), m.end(), m.group(0)
