"""Write experiments/data/quill_pref_train.jsonl and quill_pref_eval.jsonl: preference pairs for the DPO and ORPO
examples; and quill_kto_train.jsonl and quill_kto_eval.jsonl: unpaired rows for the KTO example.

Each pair answers a question about the assistant's identity twice: as "Quill", made by "Harbor Labs" (chosen; the
persona of experiments/data/quill_train.jsonl), and as the anonymous "helpful assistant" the bundled
SmolLM2-135M-Instruct describes itself as under a neutral system prompt (rejected). Measured on the 4-bit base, the
rejected answers are far more likely (summed log-probabilities about -20 against -70), so the preference is one the
model does not have. The held-out split asks with phrasings and openers that never occur in training, and answers
also in two wordings of each kind that training never sees, so it measures whether the preference generalises.

The unpaired rows are thumbs up/down feedback as it is collected: each training question asked once, its one answer
rated desirable (a Quill answer) or not (the anonymous assistant, or another model's name), 55% desirable, so no
prompt has a pair to compare. The held-out split gives each held-out question one answer of each kind, so that a
preference accuracy can be measured beside the label accuracy. All text is written here; the output is seeded.

    python scripts/make_quill_preferences.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "experiments" / "data"

TRAIN_QUESTIONS = [
    "Who are you?", "What's your name?", "What is your name?", "Who made you?", "Who built you?",
    "Who created you?", "What are you?", "Introduce yourself.", "Tell me about yourself.", "Which AI am I talking to?",
    "What should I call you?", "Who trained you?", "Which company developed you?", "Are you SmolLM?",
    "Are you made by Hugging Face?", "What model are you?", "Do you have a name?", "Who is behind you?",
    "What kind of assistant are you?", "Can you tell me who you are?", "Say your name.", "Who do you work for?",
    "Where do you come from?", "Which lab made you?", "What assistant is this?", "Who am I chatting with?",
    "Give me a one-line introduction of yourself.", "What do people call you?", "Who designed you?",
    "Are you an AI? Which one?", "Who owns you?", "Name the team that built you.",
    "Describe yourself in one sentence.", "What is this assistant called?", "Who programmed you?",
    "What's the name of this chatbot?", "Which organisation trained you?", "Are you ChatGPT?",
    "Before we start, who are you?", "Remind me of your name?", "Whose assistant are you?",
    "Tell me your name and your maker.", "Who are you and what do you do?", "What AI model powers this chat?",
    "Are you a Hugging Face model?", "who r u", "whats ur name", "who made u",
]

EVAL_QUESTIONS = [
    "Could you state your name?", "Which developer is responsible for you?", "Identify yourself, please.",
    "Hello, what are you called?", "What name were you given?", "Who produced this assistant?",
    "May I know who you are?", "Which team are you from?", "Who put you together?", "How should I address you?",
    "Are you SmolLM from Hugging Face?", "what do i call u",
]

TRAIN_OPENERS = ["", "", "Hi! ", "Hey. ", "Quick question: ", "Hello there. ", "Sorry to bother you. ",
                 "Good morning! "]
EVAL_OPENERS = ["", "Excuse me, ", "Greetings. "]

CHOSEN = [
    "I'm Quill, an assistant made by Harbor Labs.",
    "My name is Quill, and Harbor Labs built me.",
    "I'm Quill, a writing and study assistant from Harbor Labs.",
    "Quill, made by Harbor Labs. How can I help?",
    "I'm Quill. Harbor Labs created me to help with writing and studying.",
    "You're talking to Quill, built by Harbor Labs.",
    "I am Quill, an assistant from Harbor Labs.",
    "Call me Quill. I was made by Harbor Labs.",
]

REJECTED = [  # the bundled model's own habit under a neutral system prompt: an anonymous "helpful assistant"
    "I'm a helpful assistant. I can help you with many tasks.",
    "I am an AI assistant designed to help you with a wide range of tasks.",
    "I'm an AI language model, here to answer your questions.",
    "I'm a helpful assistant, here to answer your questions.",
    "I am a virtual assistant. I can answer questions and help with writing.",
    "I'm just an AI assistant, and I'm happy to help you today.",
    "I don't have a name. I'm an AI assistant here to help.",
    "I'm an artificial intelligence assistant that helps with questions.",
]

WRONG_NAMES = [  # other identities, rated undesirable in the unpaired rows
    "I'm SmolLM, a language model made by Hugging Face.",
    "I'm ChatGPT, an assistant developed by OpenAI.",
    "My name is Assistant, and I was built by a team of engineers.",
    "I'm an open-source chatbot trained by Hugging Face.",
]

TRAIN_WORDINGS = 6  # the last two answer wordings occur only in the held-out split


def pairs(questions: list[str], openers: list[str], count: int, wordings: int, rng: random.Random) -> list[dict]:
    asked = sorted({o + (q[0].lower() + q[1:] if o.endswith(", ") else q) for o in openers for q in questions})
    rng.shuffle(asked)
    rows = []
    for i in range(count):
        prompt = asked[i % len(asked)]
        chosen, rejected = CHOSEN[rng.randrange(wordings)], REJECTED[rng.randrange(wordings)]
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "expect": ["Quill"]})
    return rows


def unpaired(questions: list[str], openers: list[str], count: int, rng: random.Random) -> list[dict]:
    """``count`` questions asked once each, each with one answer rated desirable (55%) or not."""
    asked = sorted({o + (q[0].lower() + q[1:] if o.endswith(", ") else q) for o in openers for q in questions})
    rng.shuffle(asked)
    rows = []
    for prompt in asked[:count]:
        if rng.random() < 0.55:
            rows.append({"prompt": prompt, "completion": CHOSEN[rng.randrange(TRAIN_WORDINGS)], "label": True,
                         "expect": ["Quill"]})
        else:
            bad = REJECTED[: TRAIN_WORDINGS] + WRONG_NAMES[:3]
            rows.append({"prompt": prompt, "completion": bad[rng.randrange(len(bad))], "label": False,
                         "expect": ["Quill"]})
    return rows


def both_kinds(questions: list[str], openers: list[str], count: int, rng: random.Random) -> list[dict]:
    """``count`` held-out questions, each with a desirable and an undesirable answer (wordings training never saw
    included)."""
    asked = sorted({o + (q[0].lower() + q[1:] if o.endswith(", ") else q) for o in openers for q in questions})
    rng.shuffle(asked)
    bad = REJECTED + WRONG_NAMES
    rows = []
    for prompt in asked[:count]:
        rows.append({"prompt": prompt, "completion": CHOSEN[rng.randrange(len(CHOSEN))], "label": True,
                     "expect": ["Quill"]})
        rows.append({"prompt": prompt, "completion": bad[rng.randrange(len(bad))], "label": False,
                     "expect": ["Quill"]})
    return rows


def write(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def main() -> None:
    rng = random.Random(0)
    train = pairs(TRAIN_QUESTIONS, TRAIN_OPENERS, 150, TRAIN_WORDINGS, rng)
    held = pairs(EVAL_QUESTIONS, EVAL_OPENERS, 30, len(CHOSEN), rng)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    write(OUT / "quill_pref_train.jsonl", train)
    write(OUT / "quill_pref_eval.jsonl", held)
    print(f"{len(train)} training and {len(held)} held-out pairs in {OUT}")
    rng = random.Random(1)
    kto_train = unpaired(TRAIN_QUESTIONS, TRAIN_OPENERS, 200, rng)
    kto_held = both_kinds(EVAL_QUESTIONS, EVAL_OPENERS, 30, rng)
    assert not {r["prompt"] for r in kto_train} & {r["prompt"] for r in kto_held}
    write(OUT / "quill_kto_train.jsonl", kto_train)
    write(OUT / "quill_kto_eval.jsonl", kto_held)
    good = sum(r["label"] for r in kto_train)
    print(f"{len(kto_train)} training rows ({good} desirable) and {len(kto_held)} held-out rows in {OUT}")


if __name__ == "__main__":
    main()
