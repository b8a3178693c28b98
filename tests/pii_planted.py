"""Personal data planted into real rows of ../shared/datasets, for tests/test_pii.py and scripts/bench_pii.py.

Every value here was written for this project (names, addresses, ids): none comes from a corpus, and none is a
table example of data_prep/quality/pii/detectors.py, so the tests see layouts the detectors were not tuned on.
Check digits are computed here with arithmetic written independently of data_prep/quality/pii/checksums.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

# ---- check digits, computed the long way -------------------------------------------------------------------------


def luhn_digit(body: str) -> str:
    """The digit that makes body+digit pass Luhn: double every second digit counting from the check digit's left."""
    total = 0
    for pos, ch in enumerate(body[::-1]):  # pos 0 is the digit next to the check digit: doubled
        d = int(ch) * (2 if pos % 2 == 0 else 1)
        total += d // 10 + d % 10
    return str((10 - total % 10) % 10)


def nhs_number(first9: str) -> str:
    s = sum(int(c) * (10 - i) for i, c in enumerate(first9))
    check = (11 - s % 11) % 11
    assert check != 10, "pick other digits: 10 is never issued"
    return first9 + str(check)


def nir(body13: str) -> str:
    return body13 + f"{97 - int(body13) % 97:02d}"


def iban(country: str, bban: str) -> str:
    moved = bban + country + "00"
    number = int("".join(str(ord(c) - 55) if c.isalpha() else c for c in moved))
    return f"{country}{98 - number % 97:02d}{bban}"


def vin(without_check: str) -> str:
    """17 characters with position 9 set by the ISO 3779 weights (letters by their transliteration table)."""
    table = {c: v for v, letters in enumerate(["", "AJ", "BKS", "CLT", "DMU", "ENV", "FW", "GPX", "HY", "RZ"]) for c in letters}
    weights = [8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2]
    total = sum((int(c) if c.isdigit() else table[c]) * w for c, w in zip(without_check, weights))
    r = total % 11
    return without_check[:8] + ("X" if r == 10 else str(r)) + without_check[9:]


def spaced(s: str, groups: list[int], sep: str = " ") -> str:
    out, i = [], 0
    for g in groups:
        out.append(s[i:i + g])
        i += g
    return sep.join(out)


# ---- the planted values: (kind, phrase as written in the note, the secrets that must be gone) -----------------------

CARD = "453914880343646" + luhn_digit("453914880343646")
NHS = nhs_number("401023213")
NIR = nir("2690549588157")
IBAN_DE = iban("DE", "370400440532013000")
NPI = "153821947" + luhn_digit("80840" + "153821947")
VIN = vin("2HGFA16508H300412")
IMEI = "35209900176148" + luhn_digit("35209900176148")

PLANTED: list[tuple[str, str, list[str]]] = [
    ("name", "Mrs. Saoirse O'Hara", ["Saoirse", "O'Hara"]),
    ("name", "Dr Ioana Popescu-Vlad", ["Ioana", "Popescu-Vlad"]),
    ("name", "Judge Pieter van der Merwe", ["Pieter", "Merwe"]),
    ("name", "CLIENT: MARGARET O'NEILL", ["MARGARET", "O'NEILL"]),
    ("name", "Witness - Tomás Ó Briain", ["Tomás", "Briain"]),
    ("name", "signed: Kwame Mensah-Bonsu", ["Kwame", "Mensah-Bonsu"]),
    ("name", "the plaintiff, Lorenzo DiMarco,", ["Lorenzo", "DiMarco"]),
    ("name", "Mr. Hamish MacLeod", ["Hamish", "MacLeod"]),
    ("address", "88 Harbour View Drive, Unit 12, Tacoma, WA 98402", ["88 Harbour View", "Tacoma", "98402"]),
    ("address", "221B Baker Street, London NW1 6XE", ["221B Baker", "NW1 6XE"]),
    ("address", "5 rue du Faubourg Saint-Honoré, 75008 Paris", ["Faubourg Saint-Honoré", "75008"]),
    ("address", "Boise, ID 83702", ["Boise", "83702"]),
    ("date", "DOB 1957-11-03", ["1957-11-03"]),
    ("date", "admitted to the cardiac unit on 14/02/2022", ["14/02/2022"]),
    ("date", "date of discharge: 21 February 2022", ["21 February 2022"]),
    ("date", "she died on July 4th, 2020", ["July 4th, 2020"]),
    ("age", "a 94 year old widow", ["94 year"]),
    ("age", "aged 103", ["aged 103"]),
    ("age", "96yo male", ["96yo"]),
    ("ssn", "219 09 9999", ["219 09 9999"]),
    ("ssn", "SSN 078-05-1120", ["078-05-1120"]),
    ("ssn", "social security number: 219099999", ["219099999"]),
    ("national_id", f"NIR {spaced(NIR, [1, 2, 2, 2, 3, 3, 2])}", [spaced(NIR, [1, 2, 2, 2, 3, 3, 2])]),
    ("national_id", f"NHS no. {spaced(NHS, [3, 3, 4])}", [spaced(NHS, [3, 3, 4])]),
    ("national_id", "NI number JK 12 34 56 B", ["JK 12 34 56 B"]),
    ("phone", "06 12 34 56 78", ["06 12 34 56 78"]),
    ("phone", "+44 (0)161 496 0753", ["161 496 0753"]),
    ("phone", "(212) 555-0198", ["555-0198"]),
    ("phone", "Tel: 0161 496 0754", ["0161 496 0754"]),
    ("phone", "+49 30 901820", ["30 901820"]),
    ("email", "saoirse.ohara@mail.example.com", ["saoirse.ohara@mail.example.com"]),
    ("url", "https://records.example-hospital.org/patient/448213/notes", ["448213", "records.example-hospital.org"]),
    ("url", "www.example-firm.com/clients/8812", ["example-firm.com", "8812"]),
    ("ip", "203.0.113.77", ["203.0.113.77"]),
    ("ip", "2001:db8:1f70::999:de8:7648:6e8", ["2001:db8:1f70::999:de8:7648:6e8"]),
    ("record_id", "MRN 7734-2291", ["7734-2291"]),
    ("record_id", "medical record number: 004815162342", ["004815162342"]),
    ("record_id", "Docket No. 2:21-cv-00417", ["2:21-cv-00417"]),
    ("health_plan", "Member ID 88412-0097-A", ["88412-0097-A"]),
    ("health_plan", "Medicare 5EG4-TE5-MK72", ["5EG4-TE5-MK72"]),
    ("account", "account number 12345678", ["12345678"]),
    ("account", "sort code 40-47-84", ["40-47-84"]),
    ("card", spaced(CARD, [4, 4, 4, 4]), [spaced(CARD, [4, 4, 4, 4])]),
    ("card", CARD, [CARD]),
    ("iban", spaced(IBAN_DE, [4, 4, 4, 4, 4, 2]), [spaced(IBAN_DE, [4, 4, 4, 4, 4, 2])]),
    ("licence", "driver's license no. F2235-77108", ["F2235-77108"]),
    ("licence", f"NPI {NPI}", [NPI]),
    ("vehicle", VIN, [VIN]),
    ("vehicle", "licence plate: LR69 KXD", ["LR69 KXD"]),
    ("device", f"IMEI {IMEI}", [IMEI]),
    ("device", "serial no. SN-44A-9920-X", ["44A-9920"]),
    ("device", "3C:22:FB:91:0A:7E", ["3C:22:FB:91:0A:7E"]),
]

# Where a phrase goes in a host text: first, in the middle (in parentheses), last, on a line of its own.
LAYOUTS = ["{p}. {host}", "{head} ({p}) {tail}", "{host} Contact: {p}.", "Note:\n{p}\n{host}"]

# Not personal data: each must come through a build unchanged.
TRICKY = [
    "Give 5 mg of apixaban twice daily; HbA1c 6.5% and eGFR 58 mL/min/1.73 m2; BP 128/82 mmHg, pH 7.35.",
    "Under 42 U.S.C. § 1983 and Roe v. Wade, 410 U.S. 113 (1973), see also Fed. R. Evid. 801(d)(2) and 28 U.S.C. § 2254(d)(1).",
    "Section 12.3.4 and § 1.2.3.4 of the 2019 Act apply; Article 6(1) ECHR; Rule 12(b)(6).",
    "The 2011-2012 season, a 3-4-5 triangle, 48/2 = <<48/2=24>>24 clips and 12 * 34 = 408; she will be 3*30=90 years old.",
    "It cost $1,250.00 (about €1,140) in 1998; the fee rose 12.5% to $1,406.25 by 2004.",
    "Patients aged 60-75 with CD4 counts above 350 cells/µL were randomised 2:1; 95% CI 1.2-3.4, p < 0.05, n = 1,234.",
    "The Court of Appeals for the Ninth Circuit held that the Patient Protection and Affordable Care Act applies.",
    "An 8 Fr catheter; ICD-10 E11.9; EC 3.1.1.11; DOI 10.1056/NEJMoa2034577; ISBN 978-0-262-03384-8.",
    "Between 01.04.2000-31.12.2000, 1,895 patients underwent CABG at 10:30 on day 3.",
]


def host_texts(shared: Path) -> dict[str, list[str]]:
    """Real texts to plant into: PubMedQA abstracts, LegalBench hearsay facts, GSM8K problems."""
    pub = json.loads((shared / "pubmedqa" / "ori_pqal.json").read_text())
    with open(shared / "legalbench_prerelease" / "hearsay" / "train.tsv", newline="") as f:
        hearsay = [r["text"] for r in csv.DictReader(f, delimiter="\t")]
    gsm = [json.loads(line)["question"] for line in (shared / "gsm8k" / "test.jsonl").read_text().splitlines()[:200]]
    return {"medical": [" ".join(v["CONTEXTS"][:1]) for v in pub.values()][:200], "legal": hearsay, "math": gsm}


def plant(shared: Path) -> tuple[list[dict], list[tuple[str, list[str]]]]:
    """Alpaca rows, each a real host text with one planted phrase in one layout, and (kind, secrets) per row."""
    hosts = host_texts(shared)
    pools = [hosts["medical"], hosts["legal"], hosts["math"]]
    rows, truth = [], []
    i = 0
    for kind, phrase, secrets in PLANTED:
        for layout in LAYOUTS:
            pool = pools[i % 3]
            host = pool[(i * 7) % len(pool)]
            words = host.split()
            head, tail = " ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2:])
            rows.append({"instruction": "Summarise the note for the file.", "input": layout.format(p=phrase, host=host, head=head, tail=tail),
                         "output": "Noted."})
            truth.append((kind, secrets))
            i += 1
    return rows, truth


def clean_rows(shared: Path, n: int = 150) -> list[dict]:
    """Real rows with nothing planted, and the tricky non-identifiers, for the altered-row share and precision."""
    hosts = host_texts(shared)
    rows = [{"instruction": "Answer from the text.", "input": t, "output": "See the text."}
            for pool in hosts.values() for t in pool[-n // 3:]]
    rows += [{"instruction": "Read this.", "input": t, "output": "Read."} for t in TRICKY]
    return rows
