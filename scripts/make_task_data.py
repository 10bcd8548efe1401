#!/usr/bin/env python3
"""Writes the fine-tuning task of scripts/demo and scripts/results: train/validation/test JSONL of
prompt/completion pairs, deterministically (same seed, same bytes), standard library only.

Two tasks in the spirit of the Tied-LoRA paper's SQuAD and GSM8K:
  qa          extractive question answering: a context of public-domain sentences (data/text, State of the
              Union addresses) with two inserted facts; the question asks about one of them and the answer
              is a span of the context.
  arithmetic  short word problems (one addition, subtraction or multiplication of small numbers); the answer
              is a number.

Usage: make_task_data.py --out DIR [--train 1600 --validation 64 --test 200 --seed 1234]
"""
import argparse
import glob
import json
import os
import random
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIRST = ["Anna", "Ben", "Clara", "David", "Elena", "Frank", "Grace", "Henry", "Iris", "James", "Karen", "Louis",
         "Maria", "Nathan", "Olivia", "Peter", "Rosa", "Samuel", "Teresa", "Victor", "Walter", "Yvonne"]
LAST = ["Adams", "Baker", "Carter", "Dalton", "Ellis", "Fischer", "Garner", "Hughes", "Irving", "Jensen", "Keller",
        "Lawson", "Monroe", "Nolan", "Ortiz", "Parker", "Quinn", "Reyes", "Sutton", "Tucker", "Vance", "Whitman"]
CITIES = ["Albany", "Boston", "Charleston", "Denver", "Erie", "Fresno", "Galveston", "Hartford", "Ithaca",
          "Jackson", "Knoxville", "Lancaster", "Mobile", "Norfolk", "Omaha", "Pittsburgh", "Quincy", "Raleigh",
          "Savannah", "Toledo", "Utica", "Vicksburg", "Wichita", "Yonkers"]
COUNTRIES = ["Portugal", "Norway", "Chile", "Egypt", "Japan", "Peru", "Greece", "Sweden", "Morocco", "Siam"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
SHIPS = ["Constance", "Endeavor", "Liberty", "Meridian", "Northstar", "Pioneer", "Resolute", "Sentinel",
         "Valiant", "Wayfarer"]
CARGO = ["cotton", "timber", "coal", "wheat", "tobacco", "iron ore", "salt", "copper", "wool", "sugar"]
PROJECTS = ["harbor survey", "lighthouse", "canal", "post road", "naval yard", "customs house", "dry dock",
            "river survey", "army arsenal", "public library"]
OFFICES = ["collector of customs", "postmaster", "surveyor general", "marshal", "treasurer", "harbor master"]
COMMITTEES = ["committee on commerce", "board of trade", "harbor commission", "tariff board", "mint commission",
              "census board"]
ITEMS = ["apples", "books", "coins", "letters", "marbles", "pencils", "stamps", "tickets", "shells", "cards"]


def person(rng):
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


# Each fact: (sentence, [(question, answer), ...]); the answer is a span of the sentence.
def fact(rng):
    kind = rng.randrange(5)
    if kind == 0:
        committee, city, year = rng.choice(COMMITTEES), rng.choice(CITIES), rng.randrange(1795, 1990)
        return (f"The {committee} met in {city} in {year}.",
                [(f"In which city did the {committee} meet?", city),
                 (f"In what year did the {committee} meet in {city}?", str(year))])
    if kind == 1:
        who, office, city, years = person(rng), rng.choice(OFFICES), rng.choice(CITIES), rng.randrange(2, 30)
        return (f"{who} was appointed {office} of {city} after {years} years of service.",
                [(f"Who was appointed {office} of {city}?", who),
                 (f"How many years of service did {who} have before the appointment?", str(years))])
    if kind == 2:
        country, city, month, day = rng.choice(COUNTRIES), rng.choice(CITIES), rng.choice(MONTHS), rng.randrange(1, 29)
        return (f"A treaty with {country} was signed at {city} on {month} {day}.",
                [(f"Where was the treaty with {country} signed?", city),
                 (f"On what date was the treaty with {country} signed?", f"{month} {day}")])
    if kind == 3:
        ship, tons, cargo, city = rng.choice(SHIPS), rng.randrange(20, 900), rng.choice(CARGO), rng.choice(CITIES)
        return (f"The ship {ship} carried {tons} tons of {cargo} to {city}.",
                [(f"What did the ship {ship} carry to {city}?", cargo),
                 (f"How many tons of {cargo} did the ship {ship} carry?", str(tons))])
    dollars, project, city = rng.randrange(2, 90) * 1000, rng.choice(PROJECTS), rng.choice(CITIES)
    return (f"Congress appropriated {dollars} dollars for the {project} at {city}.",
            [(f"How many dollars did Congress appropriate for the {project} at {city}?", str(dollars)),
             (f"Where is the {project} that Congress funded?", city)])


def load_sentences():
    sentences = []
    for path in sorted(glob.glob(os.path.join(ROOT, "data", "text", "*.txt"))):
        with open(path, encoding="utf-8") as f:
            text = " ".join(f.read().split())
        for s in re.split(r"(?<=[.!?])\s+", text):
            words = s.split()
            headings = any(len(w) > 2 and w.isupper() for w in words)  # section titles run into sentences
            if 10 <= len(words) <= 28 and s[0].isupper() and s.endswith(".") and '"' not in s and not headings:
                sentences.append(s)
    if not sentences:
        raise SystemExit(f"no sentences found under {ROOT}/data/text")
    return sentences


def qa_example(rng, sentences):
    facts = [fact(rng), fact(rng)]
    while facts[1][0].split()[:3] == facts[0][0].split()[:3]:  # two facts of one template would be ambiguous
        facts[1] = fact(rng)
    parts = [rng.choice(sentences), facts[0][0], rng.choice(sentences), facts[1][0]]
    rng.shuffle(parts)
    question, answer = rng.choice(rng.choice(facts)[1])
    prompt = ("Answer the question with a short span copied from the context.\n\n"
              f"Context: {' '.join(parts)}\n\nQuestion: {question}")
    return {"task": "qa", "prompt": prompt, "completion": answer}


def arithmetic_example(rng):
    # One operation on small numbers: hard enough for a 135M model, learnable in minutes.
    name, other, item = rng.choice(FIRST), rng.choice(FIRST), rng.choice(ITEMS)
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randrange(2, 30), rng.randrange(2, 20)
        text, answer = f"{name} has {a} {item}. {other} gives {name} {b} more. How many {item} does {name} have now?", a + b
    elif kind == 1:
        a = rng.randrange(10, 40)
        b = rng.randrange(1, a)
        text, answer = f"{name} had {a} {item} and gave {b} of them to {other}. How many {item} does {name} have left?", a - b
    else:
        a, b = rng.randrange(2, 7), rng.randrange(2, 10)
        text, answer = f"{name} buys {a} boxes with {b} {item} in each box. How many {item} does {name} buy?", a * b
    prompt = f"Solve the problem. Reply with the number only.\n\nProblem: {text}"
    return {"task": "arithmetic", "prompt": prompt, "completion": str(answer)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=1600)
    parser.add_argument("--validation", type=int, default=64)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    sentences = load_sentences()
    seen = set()
    splits = {"train": args.train, "validation": args.validation, "test": args.test}
    os.makedirs(args.out, exist_ok=True)
    for split, count in splits.items():
        rows = []
        while len(rows) < count:
            # Alternate the tasks so every split is half QA, half arithmetic.
            example = qa_example(rng, sentences) if len(rows) % 2 == 0 else arithmetic_example(rng)
            if example["prompt"] in seen:  # no prompt appears twice, within or across splits
                continue
            seen.add(example["prompt"])
            rows.append(example)
        with open(os.path.join(args.out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{args.out}: " + ", ".join(f"{n} {s}" for s, n in splits.items()) + f" examples (seed {args.seed})")


if __name__ == "__main__":
    main()
