"""The detectors: one table, kind by kind, of what the PII scan finds and what it leaves alone on purpose.

The reference is the HIPAA Safe Harbor list (45 CFR 164.514(b)(2)) plus the European layouts medical and legal
data arrives in. Each row is a `Detector`: a pattern (or a finder), the group holding the personal value, a
check (a checksum where the identifier has one, so sums and citations are not taken for ids), examples with the
value between « », and texts it must not touch. tests/test_pii.py runs every example and every counter-example;
docs/pii.md is this table rendered (`python -m data_prep.quality.pii` prints it).

Not covered, because text cannot carry them or no pattern can tell them apart: biometric identifiers, full-face
photographs, and bare personal names without a title, label or role word (those need an NER model: ner.py).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Callable, Iterator

from . import checksums, names

_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?"
          r"|Dec(?:ember)?|janvier|février|mars|avril|mai|juin|juillet|août|septembre|octobre|novembre|décembre)")
_ORD = r"(?:st|nd|rd|th|er)?"
DATE = (rf"(?:\d{{1,2}}[/.-]\d{{1,2}}[/.-](?:\d{{4}}|\d{{2}})(?!\d)|\d{{4}}-\d{{2}}-\d{{2}}|{_MONTH}\.? \d{{1,2}}{_ORD},? \d{{4}}"
        rf"|\d{{1,2}}{_ORD}(?: of)? {_MONTH}\.?,? \d{{4}}|{_MONTH} \d{{4}})")
# An id after a label: holds a digit, may hold letters, dashes, slashes, dots, colons and parentheses (UDI syntax).
_ID = r"(?P<v>(?=[A-Za-z/.:()#-]*\d)[A-Za-z0-9(][A-Za-z0-9:/.()-]{2,}[A-Za-z0-9)])"
_NUM = r"(?P<v>\+?\(?\d[\d ().-]{5,}\d)"
_SEP = r"[ \t]*(?:[:#]|(?i:no\b\.?|number|n°|nr\.?|id\b))?[ \t]*[:#]?[ \t]*"
_STATES = ("AL|AK|AZ|AR|CA|CO|CT|DE|DC|FL|GA|HI|ID|IL|IN|IA|KS|KY|LA|ME|MD|MA|MI|MN|MS|MO|MT|NE|NV|NH|NJ|NM|NY|NC|ND|OH|OK|OR|PA|PR|RI|SC|"
           "SD|TN|TX|UT|VT|VA|WA|WV|WI|WY")
_STATE_NAMES = ("Alabama|Alaska|Arizona|Arkansas|California|Colorado|Connecticut|Delaware|Florida|Georgia|Hawaii|Idaho|Illinois|Indiana|"
                "Iowa|Kansas|Kentucky|Louisiana|Maine|Maryland|Massachusetts|Michigan|Minnesota|Mississippi|Missouri|Montana|Nebraska|"
                "Nevada|New Hampshire|New Jersey|New Mexico|New York|North Carolina|North Dakota|Ohio|Oklahoma|Oregon|Pennsylvania|"
                "Rhode Island|South Carolina|South Dakota|Tennessee|Texas|Utah|Vermont|Virginia|Washington|West Virginia|Wisconsin|Wyoming")
# "Court" and "Ct" are left out of the street types: "3 Supreme Court" is a citation far more often than an address.
_STREET_TYPE = (r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Terrace|Ter|Parkway|Pkwy|Highway|Hwy|Way|Close|"
                r"Crescent|Place|Pl|Square|Sq|Circle|Cir|Trail|Row|Gardens|Mews|Grove)")
_CITY = r"[A-Z][a-z]+(?:[ -][A-Z][a-z]+){0,2}"


def _labelled(loose: str, value: str = _ID, *, strict: str = "", case_sensitive: str = "") -> re.Pattern:
    """A label, separators, then the value (group v). `loose` labels (any case) are distinctive enough alone (MRN,
    passport); `strict` ones are ordinary words (case, file, account) and count only before a colon, #, "no." or
    "number"; `case_sensitive` ones are short acronyms that are words in lower case (DL, SN)."""
    alts = [rf"(?i:{loose})"] if loose else []
    if strict:
        alts.append(rf"(?i:{strict})(?=[ \t]*(?:[:#]|(?i:no\b|no\.|number|n°|nr\.?|id\b)))")
    if case_sensitive:
        alts.append(case_sensitive)
    return re.compile(rf"(?<![\w])(?:{'|'.join(alts)})(?!\w)\.?{_SEP}{value}")


def _digits(lo: int, hi: int) -> Callable[[str], bool]:
    return lambda v: lo <= sum(c.isdigit() for c in v) <= hi


def _ipv4(v: str) -> bool:
    try:
        ipaddress.IPv4Address(v)
    except ValueError:
        return False
    return True


def _ipv6(v: str) -> bool:
    try:
        ipaddress.IPv6Address(v)
    except ValueError:
        return False
    groups = [g for g in v.split(":") if g]
    return len(groups) >= 3 and any(len(g) >= 3 or any(c.isalpha() for c in g) for g in groups)


def _nanp_spaced(v: str) -> bool:
    d = checksums.compact(v)[-10:]
    return d[0] in "23456789" and d[3] in "23456789"


# Shapes a text must hold for whole groups of detectors to have a chance, each checked once per text: most texts
# (word problems, abstracts) hold none, and those detectors are skipped.
FEATURES = {
    "long_number": re.compile(r"\d(?:[ ./()-]{0,2}\d){6}"),  # 7+ digits: SSN, NHS, NIR, card, IBAN, phone
    "code": re.compile(r"[A-Z] ?\d|\d[A-Z]"),  # a capital beside a digit: VIN, MBI, NI number, UK postcode, DEA
    "zip": re.compile(r"\d{5}"),  # a US ZIP code
}


@dataclass(frozen=True)
class Text:
    """A text as the detectors see it: as written, lower-cased (for the keyword checks), and its FEATURES."""
    raw: str
    low: str
    features: frozenset

    @classmethod
    def of(cls, raw: str) -> "Text":
        return cls(raw, raw.lower(), frozenset(k for k, p in FEATURES.items() if p.search(raw)))


@dataclass(frozen=True)
class Detector:
    kind: str
    what: str
    pattern: re.Pattern | None = None
    valid: Callable[[str], bool] | None = None
    examples: tuple[str, ...] = ()
    not_matched: tuple[str, ...] = ()
    finder: Callable[[str], Iterator[tuple[int, int]]] | None = None
    # Text just before a match that makes it something else (an IP-shaped section number after "§").
    not_after: re.Pattern | None = None
    # Quick checks that skip the pattern on texts that cannot match (a text meets ~40 detectors; most hold none
    # of their keywords): any of `needs` in the lower-cased text, any of `cased` in the text as written, and the
    # FEATURES in `requires`.
    needs: tuple[str, ...] = ()
    cased: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()

    def could_match(self, t: Text) -> bool:
        return (all(f in t.features for f in self.requires) and (not self.needs or any(k in t.low for k in self.needs))
                and (not self.cased or any(k in t.raw for k in self.cased)))

    def find(self, t: Text | str) -> Iterator[tuple[int, int]]:
        t = Text.of(t) if isinstance(t, str) else t
        if not self.could_match(t):
            return
        text = t.raw
        if self.finder is not None:
            yield from self.finder(text)
            return
        for m in self.pattern.finditer(text):
            g = next((n for n in self.pattern.groupindex if n.startswith("v") and m.start(n) >= 0), 0)
            s, e = m.span(g)
            # A URL ends before the sentence's punctuation; any value ends before a closing parenthesis it did not open.
            while e > s and ((self.kind == "url" and text[e - 1] in ".,;:!?]'\"") or (text[e - 1] == ")" and "(" not in text[s:e - 1])):
                e -= 1
            if e <= s or (self.valid and not self.valid(text[s:e])):
                continue
            if self.not_after is not None and self.not_after.search(text[max(0, s - 12):s]):
                continue
            yield s, e


DETECTORS: list[Detector] = [
    # ---- names
    Detector("name", "a name after a title (Mr, Mrs, Ms, Dr, Prof, Judge, Sir, Mme ...), every part: apostrophes, hyphens, particles, "
             "inner capitals, diacritics, initials", finder=names.titled, cased=names.TITLE_NEEDS,
             examples=("Seen by Mrs. «Siobhan O'Hara» on the ward.", "Dr «Jean-Luc van der Berg» signed.", "Prof. «Ngũgĩ Wa Thiong'o» spoke.",
                       "Mr. «Angus McDonald» paid.", "Judge «Łucja Żółkiewska» ruled.", "Ms «J. R. Ortiz-Núñez» testified."),
             not_matched=("The Court held that Miss a dose is common.", "Dr. reviewed", "mr smith in lowercase is prose", "Will We Miss Cancers Following",
                          "a Research Nurse. Both", "an 8 Fr Wolf ureteroscope")),
    Detector("name", "a name after a label in any case (Patient:, Name:, Client:, Plaintiff:, Defendant:, Witness:, Signed:, Next of kin: ...) "
             "or an e-signature (/s/)", finder=names.labelled, needs=names.LABEL_NEEDS,
             examples=("PATIENT: «JOHN SMITH», 54", "name - «Amélie Dupont»", "Signed: «Ruth Abernathy-Cole»", "/s/ «Daniel Okafor»",
                       "Witness:«Mary Ann Lee»"),
             not_matched=("Patient: presents with chest pain.", "Name: not given", "Signed: 12 March", "Patient-Controlled Therapy")),
    Detector("name", "a name after a role word in running text (the defendant Marc Dubois, patient Maria Lopez)", finder=names.after_role,
             needs=names.ROLE_NEEDS,
             examples=("the defendant, «Marc Dubois», appealed", "patient «Maria Lopez» was seen"),
             not_matched=("the patient was seen", "the defendant In re Smith", "Patient Health Questionnaire", "the National Patient Register")),
    Detector("name", "every later use of a part of a name found above, in the same text (done by the scanner, after the rows above)",
             examples=("Mrs. Siobhan O'Hara was seen. «O'Hara» declined surgery.",), not_matched=()),
    # ---- geography smaller than a state
    Detector("address", "a street address: number, street name, street type, optional unit, city, state and ZIP",
             re.compile(rf"(?<![\w.])\d{{1,6}}[A-Za-z]?(?: [NSEW]\.?)?(?: (?:[A-Z][a-z'’.-]+|\d+(?:st|nd|rd|th))){{1,4}} {_STREET_TYPE}\b\.?"
                        rf"(?:,? (?:Apt|Apartment|Suite|Ste|Unit|Flat|#)\.? ?[A-Z0-9-]+)?(?:, {_CITY})?"
                        rf"(?:, (?:{_STATES}|{_STATE_NAMES})(?: \d{{5}}(?:-\d{{4}})?)?)?"),
             cased=tuple(" " + t for t in _STREET_TYPE.strip("(?:)").split("|")),
             examples=("lives at «1427 Maple Grove Road, Springfield, IL 62704» with", "«22 Baker Street, Apt 4B, London»",
                       "«10 W. Elm St.» is"),
             not_matched=("410 U.S. 113", "3 Supreme Court justices", "the 2 Main findings", "Part 5 Road Safety Act")),
    Detector("address", "a French street address (rue, avenue, boulevard, place ...), with its postcode and city when given",
             re.compile(r"(?<![\w.])\d{1,4}(?: ?(?:bis|ter))?,? (?:rue|avenue|av\.|boulevard|bd|place|allée|chemin|impasse|quai|route|cours) "
                        r"(?:[\wÀ-ÿ'’-]+ ){0,4}[A-ZÀ-Þ][\wÀ-ÿ'’-]+(?:,? \d{5} [A-ZÀ-Þ][a-zà-ÿ-]+(?: [A-ZÀ-Þ][a-zà-ÿ-]+)*)?"),
             needs=("rue", "av", "boulevard", "bd", "place", "allée", "chemin", "impasse", "quai", "route", "cours"),
             examples=("domicile: «12 rue des Lilas, 69003 Lyon».", "«4 bis avenue Jean Jaurès»"),
             not_matched=("la rue est longue", "article 12 du code civil")),
    Detector("address", "a German street address (…straße, …weg, …platz) with postcode and city",
             re.compile(r"\b[A-ZÄÖÜ][a-zäöüß]+(?:straße|strasse|weg|platz|allee|gasse) \d{1,4}[a-z]?(?:, \d{5} [A-ZÄÖÜ][a-zäöüß]+)?"),
             needs=("straße", "strasse", "weg ", "platz", "allee", "gasse"),
             examples=("wohnt «Lindenstraße 5, 10115 Berlin»",), not_matched=("die Straße 5", "During 2001, patients")),
    Detector("address", "a city, a comma, a US state and a ZIP code (Springfield, IL 62704; Austin, Texas 78701)",
             re.compile(rf"\b{_CITY}, (?:{_STATES}|{_STATE_NAMES}) \d{{5}}(?:-\d{{4}})?\b"), requires=("zip",),
             examples=("moved to «Austin, Texas 78701» in", "«Portland, OR 97205-1234»"),
             not_matched=("Texas v. Johnson, 491 U.S. 397", "New York 1990", "Room ID 12345")),
    Detector("address", "a ZIP or postal code after its label",
             _labelled(r"zip code|postcode|postal code|code postal", strict=r"zip", value=r"(?P<v>\d{5}(?:-\d{4})?|[A-Z]{1,2}\d[A-Z\d]? ?\d[A-Z]{2})"),
             needs=("zip", "post", "code postal"), examples=("ZIP: «90210»", "code postal «75011»"), not_matched=("zip it",)),
    Detector("address", "a UK postcode (outward and inward parts, space required)",
             re.compile(r"\b[A-PR-UWYZ][A-HK-Y]?\d[A-Z\d]? \d[ABD-HJLNP-UW-Z]{2}\b"),
             requires=("code",), examples=("Leeds «LS1 4AP»", "«SW1A 2AA»"), not_matched=("CD4 count", "M1 motorway", "A1 2B")),
    Detector("address", "an address after its label and a colon, to the end of the line, when it holds a number",
             re.compile(r"(?<![\w])(?i:address|home address|adresse)[ \t]*:[ \t]*"
                        r"(?P<v>(?=[^\n;]{0,60}\d)[^\n;]{4,80}?)(?=\.?\n|;|\.?$|\. [A-Z])"),
             needs=("address", "adresse"), examples=("Address: «Flat 3, Rose Court, Leeds LS2 9JT»\n",),
             not_matched=("address the court on appeal", "their address. In all, 129 patients")),
    # ---- dates tied to a person
    Detector("date", "a date after a birth, death, admission, discharge, service or visit label (DOB, born, date of death, admitted ...)",
             re.compile(rf"(?<![\w])(?i:DOB|D\.O\.B\.?|DOD|date of (?:birth|death|admission|discharge|service|surgery|visit|injury|accident)|"
                        rf"birth ?date|(?:admission|discharge|death|surgery|visit|operation) date|né(?:e)? le|date de naissance)\b[ \t]*[:-]?[ \t]*"
                        rf"(?P<v>{DATE})"),
             needs=("dob", "d.o.b", "dod", "date", "né"),
             examples=("DOB: «04/12/1961», admitted", "date of death «March 3, 2021»", "née le «12 mars 1948»", "Admission date: «2023-01-15»"),
             not_matched=("born in 1961", "the 2011-2012 season", "a dose of 5 mg on day 3")),
    Detector("date", "a date in the same sentence as an event of a person's care or life (born, died, admitted, discharged, seen, operated ...)",
             re.compile(rf"(?<![\w])(?i:born|died|passed away|deceased|admitted|readmitted|discharged|seen|presented|operated|injured|arrested|"
                        rf"examined|hospitali[sz]ed)\b[^.\n]{{0,60}}?\b(?i:on|dated?|le)[ \t]+(?P<v>{DATE})"),
             needs=("born", "died", "passed away", "deceased", "admitted", "discharged", "seen", "presented", "operated", "injured",
                    "arrested", "examined", "hospitali"),
             examples=("was admitted to St Mary's on «12 March 2021» with", "She died at home on «May 3rd, 2019»."),
             not_matched=("The statute was amended on 1 May 2019.", "Patients admitted in 2019 were counted.")),
    # ---- ages over 89
    Detector("age", "an age of 90 or more (years old, y/o, aged, age:)",
             re.compile(r"(?<![\w.=>*/+×-])(?<!= )(?<!\* )(?P<v>9\d|1[01]\d)(?=[- ](?:years?|yrs?)[- ]old\b|[- ]?(?:y/?o|y\.o\.)(?!\w)|-year-old)|"
                        r"(?<![\w])(?i:aged?|age:)[ \t]*(?P<v2>9\d|1[01]\d)\b"),
             needs=("old", "y/o", "yo", "y.o", "age"), examples=("a «93»-year-old woman", "aged «101», she", "Age: «97»", "«92» y/o male"),
             not_matched=("a 45-year-old man", "90 mg daily", "in 1990", "aged 60", "over 90 days", "she will be 3*30=90 years old",
                          "<<140-50=90>>90 years old")),
    # ---- national identifiers
    Detector("ssn", "a US Social Security number with dashes or spaces (never-issued ranges excluded: area 000, 666, 9xx; group 00; serial 0000)",
             re.compile(r"(?<![\d-])\d{3}([- ])\d{2}\1\d{4}(?![\d-])"), valid=checksums.ssn, requires=("long_number",),
             examples=("SSN «219 09 9999» on file", "her «123-45-6789»"), not_matched=("000-12-3456", "in 666-12-3456 form", "978-0-262-03384-8")),
    Detector("ssn", "nine digits after an SSN label", _labelled(r"SSN|SS#|social security(?: number| no\.?)?", value=r"(?P<v>\d{3}[- ]?\d{2}[- ]?\d{4})"),
             valid=checksums.ssn, needs=("ss", "social security"), examples=("SSN: «219099999»",), not_matched=("SSN: 000000000",)),
    Detector("national_id", "a French NIR (sex, year, month, department, commune, order, key = 97 - number mod 97; Corsica 2A/2B)",
             re.compile(r"(?<![\dA-Z])[12] ?\d{2} ?\d{2} ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3} ?\d{2}(?!\d)"), valid=checksums.nir, requires=("long_number",),
             examples=("NIR «2 84 05 75 056 112 01»", "«1 84 12 2B 047 058 86»"), not_matched=("2 84 05 75 056 112 99", "1 23 45 67 890 123 45")),
    Detector("national_id", "a UK NHS number (3-3-4 digits, mod 11 check digit; or ten digits after an NHS label)",
             re.compile(r"(?<![\d-])\d{3}([ -])\d{3}\1\d{4}(?![\d-])|(?<![\w])(?i:NHS(?: number| no\.?)?)[ \t]*[:#]?[ \t]*(?P<v>\d{10})\b"),
             valid=checksums.nhs, requires=("long_number",), examples=("NHS number «943 476 5919»", "NHS: «9434765919»"),
             not_matched=("NHS: 9434765918", "NHS trust 2019")),
    Detector("national_id", "a UK National Insurance number (two letters, six digits, A-D; invalid prefixes excluded)",
             re.compile(r"\b(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"),
             requires=("code",), examples=("NI «JG 10 37 21 A»", "«AB123456C»"), not_matched=("GB 12 34 56 A", "DE 12 34 56 E")),
    # ---- medical and legal record numbers
    Detector("record_id", "an id after a record label (MRN, medical record, hospital/chart/patient/encounter/accession/case/docket/file/claim number)",
             _labelled(r"MRN|medical record(?: number| no\.?| #)?|hospital number|patient id|accession|docket|dossier|IPP",
                       strict=r"case|file|claim|chart|encounter|patient|hospital|record"),
             needs=("mrn", "record", "hospital", "patient", "accession", "docket", "dossier", "ipp", "case", "file", "claim", "chart", "encounter"),
             examples=("MRN: «00483921» last week", "Patient ID «AB-2231-77»", "Case No. «1:19-cv-01234»", "dossier n° «2019/4471»"),
             not_matched=("medical record review", "in case 3 patients", "file the motion", "a 3-file set")),
    Detector("health_plan", "a health plan beneficiary or member number after its label (member ID, policy, insurance, subscriber, Medicare, Medicaid, group)",
             _labelled(r"member id|insurance id|subscriber id|beneficiary id|medicaid|medicare|health plan|carte vitale",
                       strict=r"member|policy|insurance|subscriber|beneficiary|plan (?:id|number|no)"),
             needs=("member", "insurance", "subscriber", "beneficiary", "medica", "health plan", "carte vitale", "policy", "plan "),
             examples=("Member ID: «XGH449102117»", "policy no. «PL-88213-09»"),
             not_matched=("policy 2 of the act", "intervention group: 205", "treatment plan: 2 weeks")),
    Detector("health_plan", "a Medicare Beneficiary Identifier (CMS format: 11 characters, no S L O I B Z)",
             re.compile(r"\b[1-9][AC-HJKMNP-RT-Y][AC-HJKMNP-RT-Y0-9]\d-?[AC-HJKMNP-RT-Y][AC-HJKMNP-RT-Y0-9]\d-?[AC-HJKMNP-RT-Y]{2}\d{2}\b"),
             requires=("code",), examples=("MBI «3RT7-HK2-CD41»",), not_matched=("1AB2-CD3-EF45",)),
    # ---- financial
    Detector("account", "a bank account, routing number or sort code after its label",
             _labelled(r"bank account|acct\.?|a/c|routing|sort code|RIB", strict=r"account|compte",
             value=r"(?P<v>\d[\d -]{3,}\d|(?=[A-Za-z-]*\d)[A-Za-z0-9][A-Za-z0-9-]{3,}[A-Za-z0-9])"),
             needs=("account", "acct", "a/c", "routing", "sort code", "rib", "compte"), examples=("account no. «004417789213»", "sort code «20-00-00»"),
             not_matched=("on account of 3 cases", "account for 20%")),
    # ---- licences and certificates
    Detector("licence", "a licence, certificate, passport, registration, bar, NPI, DEA, GMC or RPPS number after its label",
             _labelled(r"(?:driver'?s|driving) licen[cs]e|passport|RPPS|ADELI",
             strict=r"(?:medical |nursing |professional )?licen[cs]e|certificate|registration|bar",
                       case_sensitive=r"DL|NPI|DEA|GMC"),
             needs=("licen", "passport", "rpps", "adeli", "certificate", "registration", "bar", "dl", "npi", "dea", "gmc"),
             examples=("licence no. «D1234-56789»", "NPI «1245319599»", "passport «X12345678»", "DL «S530-4127-8890»"),
             not_matched=("licence to practise", "5 dl of water", "the certificate of 2019 origin")),
    Detector("licence", "a US DEA registration number (two letters, seven digits, check digit)",
             re.compile(r"\b[ABCDEFGHJKLMPRSTUX][A-Z9]\d{7}\b"), valid=checksums.dea, requires=("code",),
             examples=("DEA «AB1234563»",), not_matched=("AB1234564",)),
    # ---- vehicles and devices
    Detector("vehicle", "a vehicle identification number (17 characters with the ISO 3779 check digit)",
             re.compile(r"\b[A-HJ-NPR-Z0-9]{17}\b"), valid=checksums.vin, requires=("code",),
             examples=("car «1M8GDM9AXKP042788» parked",), not_matched=("ABCDEFGHJKLMNPRST", "1M8GDM9AYKP042788")),
    Detector("vehicle", "any 17-character VIN after its label", _labelled(r"VIN|vehicle identification number", value=r"(?P<v>[A-HJ-NPR-Z0-9]{17})\b"),
             needs=("vin", "vehicle identification"), examples=("VIN: «WDB12345678901234»",), not_matched=("VIN unknown",)),
    Detector("vehicle", "a licence plate after its label (plate, registration, reg., tag)",
             _labelled(r"(?:licen[cs]e|number|registration|reg\.?) plate|registration mark|immatriculation", strict=r"plate|tag|vehicle registration",
                       value=r"(?P<v>(?=[A-Z0-9 -]*\d)(?=[0-9 -]*[A-Z])[A-Z0-9]{1,4}[ -]?[A-Z0-9]{1,4}(?:[ -]?[A-Z0-9]{1,3})?)\b"),
             needs=("plate", "tag", "registration", "immatriculation"),
             examples=("licence plate «7ABC123»", "plate no. «KX-4471»", "registration mark «AB12 CDE»", "immatriculation «AB-123-CD»"),
             not_matched=("a plate of food", "tag 3")),
    Detector("device", "a device identifier or serial number after its label (serial, S/N, device ID, IMEI, UDI, implant, pacemaker)",
             _labelled(r"serial number|S/N|device (?:id|identifier|serial)|IMEI|UDI|(?:implant|pacemaker|device) serial|numéro de série",
                       strict=r"serial|device|implant|pacemaker", case_sensitive=r"SN"),
             needs=("serial", "s/n", "device", "imei", "udi", "implant", "pacemaker", "série", "sn"),
             examples=("pacemaker serial «PJN204471H»", "S/N: «A7-2231-0098»", "IMEI «490154203237518»", "UDI «(01)00844588003288(17)141120»"),
             not_matched=("a serial killer", "serial 3 episodes")),
    Detector("device", "a MAC address (six hex pairs)", re.compile(r"\b[0-9A-Fa-f]{2}([:-])[0-9A-Fa-f]{2}(?:\1[0-9A-Fa-f]{2}){4}\b"),
             needs=(":", "-"), examples=("device «00:1A:2B:3C:4D:5E»",), not_matched=("12:30:45", "at 10:20")),
    # ---- payment cards and IBANs (after the labelled ids: an IMEI after its label is a device, not a card)
    Detector("card", "a payment card number (13-19 digits, a scheme's prefix, Luhn checksum)",
             re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])"), valid=checksums.card, requires=("long_number",),
             examples=("card «4111 1111 1111 1111» expires", "«5500-0000-0000-0004»"), not_matched=("4111 1111 1111 1112", "1234 5678 9012 3456")),
    Detector("iban", "an IBAN (country, check digits, mod 97 = 1)",
             re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"), valid=checksums.iban, requires=("long_number",),
             examples=("IBAN «FR76 3000 6000 0112 3456 7890 189»", "«GB29NWBK60161331926819»"), not_matched=("FR76 3000 6000 0112 3456 7890 188",)),
    # ---- phone and fax
    Detector("phone", "an international number (+33 1 23 45 67 89, +44 (0)20 7946 0958)",
             re.compile(r"(?<![\w+])\+\d{1,3}[ .-]?(?:\(0?\d{0,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,8}){1,5}\b"), valid=_digits(8, 15), needs=("+",),
             examples=("call «+33 1 42 68 53 00» today", "«+44 (0)20 7946 0958»", "«+1-212-555-0147»"), not_matched=("+3 points", "+20 dB")),
    Detector("phone", "a North American number ((555) 201-7788, 555-201-7788, 1-800-555-0199)",
             re.compile(r"(?<![\w-])(?:1[ .-])?(?:\(\d{3}\) ?|\d{3}[.-])\d{3}[.-]\d{4}\b"), requires=("long_number",),
             examples=("Call «(555) 201-7788»", "«1-800-555-0199»", "«212.555.0147»"), not_matched=("in 2011-2012", "a 3-4-5 triangle", "pages 110-1230")),
    Detector("phone", "a North American number written with spaces (415 555 0147; area and exchange codes 2-9 as assigned)",
             re.compile(r"(?<![\w-])\d{3} \d{3} \d{4}(?![\d-])"), valid=_nanp_spaced, requires=("long_number",),
             examples=("ring «415 555 0147»",), not_matched=("100 200 3000 units",)),
    Detector("phone", "a European number with a trunk 0, in pairs (06 12 34 56 78) or groups (020 7946 0958, 030/1234567)",
             re.compile(r"(?<![\d.,/-])0[1-9]([ .-]?)\d{2}(?:\1\d{2}){3}(?![\d])|(?<![\d.,/-])0\d{2,4}(?:[ /-]\d{2,8}){1,3}(?![\d/])"),
             valid=_digits(10, 11), requires=("long_number",),
             examples=("portable «06 12 34 56 78»", "«07700 900123»", "«020 7946 0958»", "«0612345678»", "«01.42.68.53.00»"),
             not_matched=("0.5 mg", "01/2019", "score 0 10 20", "between 01.04.2000-31.12.2000")),
    Detector("phone", "any number after a phone, fax, mobile or pager label",
             _labelled(r"tel|telephone|phone|fax|facsimile|mobile|cell|pager|portable|téléphone|contact number", _NUM), valid=_digits(7, 15),
             requires=("long_number",),
             needs=("tel", "phone", "fax", "facsimile", "mobile", "cell", "pager", "portable", "téléphone", "contact number"),
             examples=("Fax: «555 0199 123»", "tel. «4471 22 33 44»"), not_matched=("phone 911 now",)),
    # ---- electronic contact
    Detector("email", "an email address",
             re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
             needs=("@",), examples=("Write to «jane.roe@example.org».", "«o.hara+ward@nhs-trust.example.uk»"), not_matched=("the @ sign", "user@localhost")),
    Detector("url", "a web address (http, https, www.): a URL can carry a patient number, so all are removed",
             re.compile(r"(?i)\b(?:https?://|www\.)[^\s<>\"'\]\[]+"),
             needs=("http", "www."), examples=("see «https://portal.example-hospital.org/chart?patient=448213».", "at «www.example-clinic.com/records/88»"),
             not_matched=("e.g. the U.S. Supreme Court", "version 2.1")),
    Detector("ip", "an IPv4 address (every octet 0-255; not after § or 'section')",
             re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)"), valid=_ipv4,
             not_after=re.compile(r"(?i)(?:§+|sec(?:tion|t?s?)\.?|para\.?|art\.?|rule|EC)\s*$"), needs=(".",),
             examples=("logged in from «192.168.14.201»", "host «10.0.0.7»."),
             not_matched=("§ 1.2.3.4", "section 12.3.4.5", "EC 3.1.1.11", "999.1.1.1", "version 1.2.3")),
    Detector("ip", "an IPv6 address", re.compile(r"(?i)(?<![\w:])(?:[0-9a-f]{1,4}:){1,7}(?::|[0-9a-f]{1,4})(?::?[0-9a-f]{1,4}){0,6}(?![\w:])"),
             valid=_ipv6, needs=(":",), examples=("from «2001:db8:85a3::8a2e:370:7334»", "«fe80::1ff:fe23:4567:890a»"),
             not_matched=("at 10:30", "a 2:1 ratio", "12:30:45")),
]

# The last name row has no pattern: the scanner does it once the other names of a text are known.
KINDS: tuple[str, ...] = tuple(dict.fromkeys(d.kind for d in DETECTORS))
ACTIVE = [d for d in DETECTORS if d.finder is not None or d.pattern is not None]


def markdown_table() -> str:
    """docs/pii.md's table: kind, what it matches, examples, what it deliberately leaves alone."""
    def cell(items):
        return "<br>".join("`" + t.replace("«", "").replace("»", "").replace("|", "\\|").replace("\n", " ").strip() + "`" for t in items) or "-"

    rows = ["| kind | what it matches | example | deliberately not matched |", "|---|---|---|---|"]
    for d in DETECTORS:
        rows.append(f"| {d.kind} | {d.what} | {cell(d.examples)} | {cell(d.not_matched)} |")
    return "\n".join(rows)

