"""Write recipes/samples/*.jsonl: small instruction sets written for this project, used by `--smoke`.

The text below is our own (no third-party data). Run from the project root: `python scripts/make_samples.py`.
Math rows are generated with their answers computed here, so every answer is right.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "recipes" / "samples"

LEGAL_FACTS = [
    ("A tenant withholds rent because the landlord refuses to repair a broken heating system in winter.", "Possibly lawful in many jurisdictions if the tenant follows the statutory repair-and-deduct or escrow procedure; withholding without notice risks eviction."),
    ("An employee signs a non-compete clause covering the whole country for ten years.", "Likely unenforceable or reducible: courts require restrictions that are reasonable in scope, geography and duration."),
    ("A buyer discovers the seller knew about hidden water damage and said nothing.", "The buyer may have a claim for fraudulent concealment or misrepresentation, depending on disclosure duties."),
    ("A contract is signed by a sixteen-year-old for a sports car.", "Generally voidable at the minor's option, since the car is not a necessary."),
    ("Two companies agree by email on price, quantity and delivery date for steel beams.", "An email exchange can form a binding contract if offer, acceptance and consideration are present."),
    ("A witness testifies about what a bystander shouted right after the crash.", "This is hearsay, but it may be admitted as an excited utterance."),
    ("A shop posts a sign saying it is not liable for any injury on its premises.", "Such disclaimers rarely exclude liability for the shop's own negligence toward visitors."),
    ("A software licence forbids reverse engineering, and a user decompiles it for interoperability.", "Some jurisdictions permit decompilation for interoperability despite contractual terms; others enforce the clause."),
    ("A landlord enters the flat without notice to show it to buyers.", "Most tenancy laws require reasonable notice before entry except in emergencies."),
    ("A company uses a competitor's trademark in search ads that clearly name the advertiser.", "Keyword advertising is often lawful when the ad does not confuse consumers about origin."),
    ("A will is signed by the testator but by only one witness where two are required.", "The will may be invalid for lack of due execution, unless a saving statute applies."),
    ("A driver is stopped and police search the trunk without consent or a warrant.", "The search may be unlawful unless probable cause or another exception applies, and evidence may be excluded."),
]
LEGAL_TERMS = [
    ("force majeure", "a clause excusing performance when extraordinary events beyond the parties' control prevent it"),
    ("consideration", "something of value each party gives, which makes a promise enforceable as a contract"),
    ("indemnity", "a promise by one party to cover the other's losses arising from specified events"),
    ("estoppel", "a rule preventing a party from going back on a position another party relied upon"),
    ("tort", "a civil wrong, other than a breach of contract, for which the law gives a remedy"),
    ("hearsay", "an out-of-court statement offered to prove the truth of what it asserts"),
    ("liquidated damages", "a sum fixed in the contract as a genuine pre-estimate of loss on breach"),
    ("arbitration", "private dispute resolution in which a neutral decides and the award is binding"),
    ("due diligence", "the investigation a party carries out before a transaction to check facts and risks"),
    ("statute of limitations", "the deadline after which a claim can no longer be brought"),
    ("fiduciary duty", "an obligation to act in another's best interest, as a trustee or director must"),
    ("severability", "a clause keeping the rest of a contract in force if one part is held invalid"),
]
MARKS = [("Apple for computers", "arbitrary"), ("Sharp for televisions", "suggestive"), ("Bank for a bank", "generic"),
         ("Quick Print for a print shop", "descriptive"), ("Kodak for cameras", "fanciful"), ("Coppertone for sun lotion", "suggestive"),
         ("Salt for table salt", "generic"), ("Blue Ribbon for awards", "descriptive"), ("Zyntrel for medicine", "fanciful"),
         ("Polar for ice cream", "arbitrary"), ("Fresh Baked for bread", "descriptive"), ("Quiklock for locks", "suggestive")]

MED_QA = [
    ("Does regular aerobic exercise lower resting blood pressure in adults with hypertension?", "yes", "Trials show moderate aerobic training lowers systolic pressure by several mmHg."),
    ("Do antibiotics shorten the course of an uncomplicated viral cold?", "no", "Colds are viral; antibiotics do not act on viruses and add side effects."),
    ("Is vitamin D supplementation effective in preventing all fractures in healthy adults?", "maybe", "Results differ by dose, baseline levels and calcium co-supplementation."),
    ("Does hand washing reduce hospital-acquired infections?", "yes", "Hand hygiene programmes are consistently linked with fewer infections."),
    ("Is smoking cessation associated with lower risk of coronary heart disease?", "yes", "Risk falls within a few years of quitting."),
    ("Does a single high reading confirm a diagnosis of diabetes without symptoms?", "no", "Guidelines ask for a repeat test unless symptoms are clear."),
    ("Does early mobilisation after surgery reduce length of stay?", "maybe", "Many studies report benefit, but effects vary by procedure."),
    ("Do statins lower LDL cholesterol?", "yes", "Statins inhibit HMG-CoA reductase and reliably reduce LDL."),
    ("Is routine MRI useful for acute low back pain without red flags?", "no", "Imaging rarely changes management and may lead to needless procedures."),
    ("Does mindfulness training reduce anxiety symptoms in primary care patients?", "maybe", "Small trials are promising but evidence quality is mixed."),
    ("Does vaccination against influenza reduce hospital admissions in older adults?", "yes", "Observational and trial data show fewer admissions in vaccinated groups."),
    ("Is paracetamol more effective than placebo for chronic low back pain?", "no", "Trials found no meaningful difference from placebo."),
]
MED_DEFS = [
    ("tachycardia", "a resting heart rate above 100 beats per minute"), ("anaemia", "a lower than normal haemoglobin concentration"),
    ("hypoglycaemia", "blood glucose below the normal range, often under 4 mmol/L"), ("sepsis", "life-threatening organ dysfunction caused by a dysregulated response to infection"),
    ("dyspnoea", "the sensation of difficult or laboured breathing"), ("oedema", "swelling caused by fluid in the body's tissues"),
    ("bradycardia", "a resting heart rate below 60 beats per minute"), ("hypertension", "persistently raised arterial blood pressure"),
    ("pyrexia", "a body temperature above the normal range; fever"), ("syncope", "a brief loss of consciousness from reduced blood flow to the brain"),
]

NAMES = ["Ana", "Ben", "Chloe", "Dev", "Ema", "Farid", "Gia", "Hugo", "Ines", "Jon", "Kai", "Lena", "Mo", "Nia", "Omar", "Pia"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells"]


def legal_rows(rng: random.Random) -> list[dict]:
    rows = []
    for fact, answer in LEGAL_FACTS:
        rows.append({"instruction": "Analyse the legal issue in the situation and give a short answer.", "input": fact, "output": answer})
    for term, meaning in LEGAL_TERMS:
        rows.append({"instruction": f"Define the legal term '{term}' in one sentence.", "input": "", "output": f"In law, {term} is {meaning}."})
    for mark, cat in MARKS:
        rows.append({"instruction": "Classify the trademark on the Abercrombie spectrum (generic, descriptive, suggestive, arbitrary, fanciful).",
                     "input": mark, "output": cat})
    rng.shuffle(rows)
    return rows


def medical_rows(rng: random.Random) -> list[dict]:
    rows = []
    for q, label, why in MED_QA:
        rows.append({"instruction": "Answer the biomedical research question with yes, no or maybe, then explain briefly.", "input": q, "output": f"{label}. {why}"})
    for term, meaning in MED_DEFS:
        rows.append({"instruction": f"What does the clinical term '{term}' mean?", "input": "", "output": f"{term.capitalize()} means {meaning}."})
    rng.shuffle(rows)
    return rows


def math_row(rng: random.Random) -> dict:
    a, b, c = rng.randint(3, 40), rng.randint(2, 25), rng.randint(2, 6)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(3)
    if kind == 0:
        q = f"{name} has {a} {item} and buys {b} more. Then {name} gives away {c}. How many {item} does {name} have now?"
        ans = a + b - c
        steps = f"{name} starts with {a} and buys {b}: {a} + {b} = {a + b}. Giving away {c} leaves {a + b} - {c} = {ans}."
    elif kind == 1:
        q = f"A box holds {b} {item}. {name} fills {c} boxes and has {a} loose {item}. How many {item} are there in total?"
        ans = b * c + a
        steps = f"{c} boxes of {b} hold {c} * {b} = {b * c}. Adding {a} loose ones gives {b * c} + {a} = {ans}."
    else:
        total = b * c
        q = f"{name} shares {total} {item} equally among {c} friends. How many {item} does each friend get?"
        ans = b
        steps = f"Each friend gets {total} / {c} = {ans}."
    return {"instruction": q, "input": "", "output": f"{steps}\nThe answer is \\boxed{{{ans}}}."}


# Small eval tasks for --smoke, of the types the real recipes use (all text written for this project).
GENERAL_MC = [  # general knowledge: what a specialist should not forget
    ("Which planet is closest to the Sun?", ["Venus", "Mercury", "Mars", "Earth"], 1),
    ("How many days are there in a leap year?", ["365", "364", "366", "360"], 2),
    ("Which gas do plants take in for photosynthesis?", ["Oxygen", "Nitrogen", "Helium", "Carbon dioxide"], 3),
    ("What is the boiling point of water at sea level in degrees Celsius?", ["100", "90", "120", "80"], 0),
    ("Which ocean is the largest?", ["Atlantic", "Indian", "Pacific", "Arctic"], 2),
    ("How many sides does a hexagon have?", ["Five", "Six", "Seven", "Eight"], 1),
    ("Which metal is liquid at room temperature?", ["Mercury", "Iron", "Copper", "Silver"], 0),
    ("What is the largest organ of the human body by area?", ["Liver", "Lung", "Heart", "Skin"], 3),
    ("Which continent is Kenya in?", ["Asia", "Africa", "Europe", "South America"], 1),
    ("How many minutes are in two hours?", ["100", "60", "120", "240"], 2),
]
# More general knowledge, generated from fact tables (facts, worded by us), so that --laptop reports forgetting with a
# usable interval: 10 items give a 95% CI of about +-30 points, 100 about +-10.
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Italy", "Rome"),
            ("Spain", "Madrid"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"),
            ("Russia", "Moscow"), ("China", "Beijing"), ("Germany", "Berlin"), ("Ireland", "Dublin"), ("Portugal", "Lisbon"),
            ("Austria", "Vienna"), ("Thailand", "Bangkok"), ("Argentina", "Buenos Aires"), ("Sweden", "Stockholm"),
            ("Poland", "Warsaw"), ("Cuba", "Havana"), ("Chile", "Santiago"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
            ("Hungary", "Budapest"), ("Belgium", "Brussels"), ("India", "New Delhi"), ("Mexico", "Mexico City"),
            ("South Korea", "Seoul"), ("Turkey", "Ankara")]
SYMBOLS = [("gold", "Au"), ("silver", "Ag"), ("iron", "Fe"), ("sodium", "Na"), ("potassium", "K"), ("oxygen", "O"),
           ("hydrogen", "H"), ("carbon", "C"), ("nitrogen", "N"), ("lead", "Pb"), ("copper", "Cu"), ("helium", "He"),
           ("calcium", "Ca"), ("tin", "Sn"), ("zinc", "Zn")]
COUNTS = [("legs does a spider have", "8"), ("legs does an insect have", "6"), ("days are in a week", "7"),
          ("months are in a year", "12"), ("hours are in a day", "24"), ("sides does a triangle have", "3"),
          ("sides does an octagon have", "8"), ("players are on a football (soccer) team on the field", "11"),
          ("continents are there", "7"), ("planets are in the Solar System", "8"), ("seconds are in a minute", "60"),
          ("strings does a standard violin have", "4"), ("centimetres are in a metre", "100"), ("grams are in a kilogram", "1000"),
          ("weeks are in a year", "52")]


def general_mc(rng: random.Random) -> list[tuple[str, list[str], int]]:
    items = list(GENERAL_MC)

    def ask(question: str, right: str, pool: list[str]) -> None:
        wrong = rng.sample([x for x in pool if x != right], 3)
        choices = wrong + [right]
        rng.shuffle(choices)
        items.append((question, choices, choices.index(right)))

    for country, city in CAPITALS:
        ask(f"What is the capital of {country}?", city, [c for _, c in CAPITALS])
    for element, symbol in SYMBOLS:
        ask(f"What is the chemical symbol of {element}?", symbol, [s for _, s in SYMBOLS])
    for what, n in COUNTS:
        ask(f"How many {what}?", n, sorted({c for _, c in COUNTS}))
    return items


MED_MC = [
    ("A resting heart rate above 100 beats per minute is called what?", ["Bradycardia", "Tachycardia", "Syncope", "Oedema"], 1),
    ("Which hormone lowers blood glucose?", ["Glucagon", "Cortisol", "Insulin", "Adrenaline"], 2),
    ("Swelling caused by fluid in the tissues is called what?", ["Oedema", "Pyrexia", "Anaemia", "Dyspnoea"], 0),
    ("Which vitamin deficiency causes scurvy?", ["Vitamin A", "Vitamin D", "Vitamin K", "Vitamin C"], 3),
    ("Which organ produces bile?", ["Pancreas", "Liver", "Spleen", "Kidney"], 1),
    ("A body temperature above the normal range is called what?", ["Hypothermia", "Syncope", "Pyrexia", "Sepsis"], 2),
    ("Which blood cells carry oxygen?", ["Red blood cells", "Platelets", "Neutrophils", "Lymphocytes"], 0),
    ("Difficult or laboured breathing is called what?", ["Dysphagia", "Dysuria", "Dysphasia", "Dyspnoea"], 3),
]
MED_YNM = [
    ("Does daily walking improve blood sugar control in type 2 diabetes?", "Walking programmes lowered HbA1c in several trials.", "yes"),
    ("Do antibiotics cure viral sore throats?", "Viral infections do not respond to antibiotics.", "no"),
    ("Does drinking coffee prevent dementia?", "Observational findings are mixed and trials are lacking.", "maybe"),
    ("Does stopping smoking lower the risk of lung cancer?", "Risk declines steadily in the years after quitting.", "yes"),
    ("Do vitamin C supplements prevent colds in the general population?", "Large trials found no reduction in how often colds occur.", "no"),
    ("Does music therapy reduce pain after surgery?", "Some small studies report benefit, others none.", "maybe"),
]
HEARSAY = [  # (situation, Yes/No): an out-of-court statement offered for its truth is hearsay
    ("On the issue of whether Nora was at home, Paul testifies that Nora told him she was at home all evening.", "Yes"),
    ("On the issue of whether the road was icy, the fact that several cars slid on it that morning.", "No"),
    ("To prove that the lamp was broken, a letter from the buyer to a friend saying the lamp was broken on arrival.", "Yes"),
    ("On the issue of whether Omar could speak French, the fact that he ordered dinner in French.", "No"),
    ("To prove that the fence was on Lee's land, Lee's neighbour testifies that a surveyor told her the fence was on Lee's land.", "Yes"),
    ("On the issue of whether Tara was in the room, a witness testifies that she saw Tara there.", "No"),
    ("To prove the delivery was late, a driver's note to his manager saying he arrived two days late.", "Yes"),
    ("On the issue of whether Ravi was angry, the fact that he slammed the door and left.", "No"),
]
EVAL_MARKS = [("Lumora for light bulbs", "fanciful"), ("Glacier for sports cars", "arbitrary"), ("Sofa for sofas", "generic"),
              ("Crispy Fries for fries", "descriptive"), ("Rapidwrap for parcels", "suggestive"), ("Chair for chairs", "generic"),
              ("Velqor for headphones", "fanciful"), ("Sunset for banking", "arbitrary")]


def gsm8k_style(row_id: str, row: dict) -> dict:
    """A generated problem as a GSM8K test row: the worked solution, then "#### N"."""
    answer = row["output"].rsplit("{", 1)[1].rstrip("}.")
    return {"id": row_id, "question": row["instruction"], "answer": row["output"].split("\nThe answer")[0] + f"\n#### {answer}"}


def mc_rows(items) -> list[dict]:
    return [{"id": f"q{i}", "question": q, "choices": c, "answer": a} for i, (q, c, a) in enumerate(items, start=1)]


def documents(rng: random.Random) -> dict[str, list[dict]]:
    """Short documents for the continued-pretraining smoke stage: domain prose and general prose to replay."""
    med = [f"{t.capitalize()} is {m}. Clinicians record it in the notes and review it at follow-up." for t, m in MED_DEFS]
    med += [f"Research question: {q} Summary: {why}" for q, _, why in MED_QA]
    legal = [f"In law, {t} means {m}. Courts apply the rule case by case." for t, m in LEGAL_TERMS]
    legal += [f"Situation: {f} Analysis: {a}" for f, a in LEGAL_FACTS]
    general = ["Rivers carry water from high ground to the sea, shaping valleys over thousands of years.",
               "A library lends books, music and films, and many now offer courses and study rooms.",
               "Bread is made from flour, water, salt and yeast, left to rise before it is baked.",
               "Bicycles are efficient: most of the rider's effort turns into forward motion.",
               "The calendar year has twelve months, and a leap year adds a day to February.",
               "Trees take in carbon dioxide and release oxygen, and their roots hold the soil together."]
    for docs in (med, legal, general):
        rng.shuffle(docs)
    return {"medical_docs.jsonl": [{"text": t} for t in med], "legal_docs.jsonl": [{"text": t} for t in legal],
            "general_docs.jsonl": [{"text": t} for t in general]}


# --laptop rows for the legal recipe on a clone without its Hub data: the hearsay rule and the Abercrombie spectrum,
# generated from templates written here (people, facts and marks are invented), each row with its reason.
PEOPLE = ["Amara", "Bruno", "Carla", "Dmitri", "Elena", "Femi", "Greta", "Hamid", "Iris", "Jonas", "Keiko", "Luis", "Maya",
          "Nikos", "Olga", "Priya", "Quentin", "Rosa", "Samir", "Tess"]
EVENTS = [("ran the red light", "had run the red light"), ("broke the window", "had broken the window"),
          ("took the money from the till", "had taken the money from the till"), ("started the fire", "had started the fire"),
          ("signed the lease", "had signed the lease"), ("was at the harbour that night", "had been at the harbour that night"),
          ("sold the stolen watches", "had sold the stolen watches"), ("hit the cyclist", "had hit the cyclist"),
          ("forged the cheque", "had forged the cheque"), ("left the gate open", "had left the gate open")]
TRAITS = [("a skilled swimmer", "won the regional swimming final"), ("afraid of dogs", "crossed the street whenever a dog approached"),
          ("wealthy", "bought three houses in one year"), ("left-handed", "always wrote with a pen in the left hand"),
          ("tired on the day of the accident", "fell asleep twice during the morning meeting"),
          ("familiar with the machine", "repaired it every week for ten years"), ("careful with money", "kept receipts for every purchase"),
          ("a fluent French speaker", "worked as a translator in Lyon"), ("sober that evening", "drank only water at the party"),
          ("in pain", "limped and held his side all afternoon")]
WARNINGS = [("the stairs were broken", "the stairs"), ("the brakes were failing", "the brakes"), ("the roof leaked", "the roof"),
            ("the dog had bitten before", "the dog"), ("the wiring was faulty", "the wiring")]


def hearsay_rows(rng: random.Random, n: int) -> list[dict]:
    """Five kinds of evidence, as the hearsay rule sorts them: two are hearsay, three are not."""
    rows = []
    for _ in range(n):
        a, b, c = rng.sample(PEOPLE, 3)
        kind = rng.randrange(5)
        if kind == 0:
            did, had = rng.choice(EVENTS)
            text = f"On the issue of whether {a} {did}, the fact that {b} told {c} that {a} {had}."
            label, why = "Yes", f"{b}'s statement was made out of court and is offered to prove that {a} {did}."
        elif kind == 1:
            did, had = rng.choice(EVENTS)
            text = f"On the issue of whether {a} {did}, the fact that {a} nodded when {c} asked whether {a} {had}."
            label, why = "Yes", "The nod is conduct meant as an assertion, made out of court and offered for its truth."
        elif kind == 2:
            trait, act = rng.choice(TRAITS)
            text = f"On the issue of whether {a} was {trait}, the fact that {a} {act}."
            label, why = "No", f"{a}'s conduct was not meant to assert anything, so it is not a statement."
        elif kind == 3:
            danger, thing = rng.choice(WARNINGS)
            text = f"To show that {a} knew about the danger, the fact that {b} warned {a} that {danger}."
            label, why = "No", f"The warning is offered to show that {a} had notice of {thing}, not that it was true."
        else:
            did, had = rng.choice(EVENTS)
            text = f"At trial, {b} testified on direct examination that {b} saw {a} as {a} {did}."
            label, why = "No", f"{b}'s statement was made in court, as a witness, so it is not hearsay."
        rows.append({"instruction": "Is the evidence hearsay? Answer Yes or No, then give the reason.", "input": text, "output": f"{label}. {why}"})
    return rows


PRODUCTS = ["bread", "shoes", "soap", "coffee", "bicycles", "lamps", "tea", "paint", "rope", "glue", "pens", "chairs", "socks",
            "honey", "tyres", "batteries", "candles", "gloves", "jam", "umbrellas"]
QUALITIES = ["Fresh", "Soft", "Quick", "Strong", "Bright", "Warm", "Sweet", "Durable", "Smooth", "Clean"]
COMMON_WORDS = ["Orbit", "Maple", "Falcon", "Harbor", "Pebble", "Lantern", "Meadow", "Comet", "Violin", "Glacier", "Tulip", "Anchor"]
SUGGESTIVE = [("Dreamstep", "shoes"), ("Sunrise Brew", "coffee"), ("Stickfast", "glue"), ("Glowhome", "lamps"),
              ("Everdry", "umbrellas"), ("Cloudrest", "chairs"), ("Roadgrip", "tyres"), ("Longlife", "batteries"),
              ("Beehive Gold", "honey"), ("Handshield", "gloves"), ("Inkflow", "pens"), ("Featherfoot", "socks"),
              ("Morning Hearth", "bread"), ("Silkwash", "soap"), ("Colourburst", "paint")]
SYLLABLES = ["zor", "vex", "qua", "lum", "dri", "kel", "nox", "bri", "tav", "mir", "pol", "yut"]


def mark_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        kind = rng.randrange(5)
        product = rng.choice(PRODUCTS)
        if kind == 0:
            mark, label, why = product.capitalize(), "generic", "The mark is the common name of the product itself."
        elif kind == 1:
            quality = rng.choice(QUALITIES)
            mark, label, why = f"{quality} {product.capitalize()}", "descriptive", f"The mark directly describes a quality of the product ({quality.lower()})."
        elif kind == 2:
            mark, product = rng.choice(SUGGESTIVE)
            label, why = "suggestive", "The mark hints at a quality of the product, but it takes imagination to connect them."
        elif kind == 3:
            mark, label, why = rng.choice(COMMON_WORDS), "arbitrary", "The mark is a common word with no connection to the product."
        else:
            mark = "".join(rng.sample(SYLLABLES, 2)).capitalize()
            label, why = "fanciful", "The mark is an invented word with no meaning of its own."
        rows.append({"instruction": "Classify the trademark on the Abercrombie spectrum (generic, descriptive, suggestive, arbitrary, fanciful), then give the reason.",
                     "input": f"The mark \"{mark}\" for {product}.", "output": f"{label}. {why}"})
    return rows


def write(name: str, rows: list[dict]) -> None:
    with open(OUT / name, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = random.Random(2026)
    legal = legal_rows(rng)
    write("legal.jsonl", legal[:30])
    write("legal_eval.jsonl", legal[30:])
    med = medical_rows(rng)
    write("medical_eval.jsonl", med[16:])
    # The medical recipe trains with the chat template, so its sample rows are conversations in `messages` form.
    write("medical.jsonl", [{"messages": [{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}".strip()},
                                               {"role": "assistant", "content": r["output"]}]} for r in med[:16]])
    maths = [math_row(rng) for _ in range(48)]
    write("math.jsonl", maths[:40])
    write("math_eval.jsonl", maths[40:])
    # eval tasks: GSM8K-style gold answers ending "#### N"; MC; classification
    tests = [math_row(rng) for _ in range(10)]
    write("math_test.jsonl", [gsm8k_style(f"m{i}", r) for i, r in enumerate(tests, start=1)])
    write("general_mc.jsonl", mc_rows(general_mc(random.Random(7))))
    # --laptop on a clone without GSM8K's files: enough generated problems for 60 steps of 8 rows, and a test set of its own
    lrng = random.Random(15)
    write("math_laptop.jsonl", [math_row(lrng) for _ in range(480)])
    write("math_laptop_test.jsonl", [gsm8k_style(f"t{i}", math_row(lrng)) for i in range(1, 61)])
    legal_laptop = hearsay_rows(lrng, 240) + mark_rows(lrng, 160) + legal
    lrng.shuffle(legal_laptop)
    write("legal_laptop.jsonl", legal_laptop)
    write("medical_mc.jsonl", mc_rows(MED_MC))
    write("medical_ynm.jsonl", [{"id": f"p{i}", "question": q, "context": c, "label": l} for i, (q, c, l) in enumerate(MED_YNM, start=1)])
    write("legal_hearsay.jsonl", [{"id": f"h{i}", "text": t, "label": l} for i, (t, l) in enumerate(HEARSAY, start=1)])
    write("legal_marks.jsonl", [{"id": f"t{i}", "text": f"The mark \"{m.split(' for ')[0]}\" for {m.split(' for ')[1]}.", "label": l}
                                for i, (m, l) in enumerate(EVAL_MARKS, start=1)])
    for name, rows in documents(rng).items():
        write(name, rows)


if __name__ == "__main__":
    main()
