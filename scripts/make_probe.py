"""Writes fx's general-ability probe (core/harness/probe/*.jsonl), a task for lm-evaluation-harness: short factual,
arithmetic, reading and instruction-following items, written for fx. The facts and sentences are the tables below;
arithmetic and reading items are drawn from them with a fixed seed, so the files are the same on every run
(tests/test_harness.py holds the committed files to this script).

    .venv/bin/python scripts/make_probe.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "core" / "harness" / "probe"

# question, the right answer, three wrong ones
FACTS = [
    ("What is the capital of France?", "Paris", "Lyon", "Marseille", "Nice"),
    ("What is the capital of Japan?", "Tokyo", "Osaka", "Kyoto", "Seoul"),
    ("What is the capital of Italy?", "Rome", "Milan", "Naples", "Venice"),
    ("What is the capital of Germany?", "Berlin", "Munich", "Hamburg", "Vienna"),
    ("What is the capital of Spain?", "Madrid", "Barcelona", "Seville", "Lisbon"),
    ("What is the capital of Canada?", "Ottawa", "Toronto", "Vancouver", "Montreal"),
    ("What is the capital of Australia?", "Canberra", "Sydney", "Melbourne", "Perth"),
    ("What is the capital of Egypt?", "Cairo", "Alexandria", "Luxor", "Tunis"),
    ("What is the capital of Russia?", "Moscow", "Saint Petersburg", "Kyiv", "Minsk"),
    ("What is the capital of China?", "Beijing", "Shanghai", "Hong Kong", "Taipei"),
    ("What is the capital of India?", "New Delhi", "Mumbai", "Kolkata", "Karachi"),
    ("What is the capital of Brazil?", "Brasilia", "Rio de Janeiro", "Sao Paulo", "Buenos Aires"),
    ("What is the capital of the United Kingdom?", "London", "Manchester", "Edinburgh", "Dublin"),
    ("What is the capital of the United States?", "Washington, D.C.", "New York", "Chicago", "Los Angeles"),
    ("What is the capital of Greece?", "Athens", "Sparta", "Thessaloniki", "Istanbul"),
    ("What is the capital of Portugal?", "Lisbon", "Porto", "Madrid", "Faro"),
    ("What is the capital of Norway?", "Oslo", "Bergen", "Stockholm", "Helsinki"),
    ("What is the capital of Sweden?", "Stockholm", "Gothenburg", "Oslo", "Copenhagen"),
    ("What is the capital of Kenya?", "Nairobi", "Mombasa", "Kampala", "Addis Ababa"),
    ("What is the capital of Mexico?", "Mexico City", "Guadalajara", "Cancun", "Monterrey"),
    ("What is the capital of Argentina?", "Buenos Aires", "Cordoba", "Santiago", "Montevideo"),
    ("What is the capital of Turkey?", "Ankara", "Istanbul", "Izmir", "Athens"),
    ("What is the capital of South Korea?", "Seoul", "Busan", "Pyongyang", "Tokyo"),
    ("What is the capital of Poland?", "Warsaw", "Krakow", "Prague", "Gdansk"),
    ("What is the capital of Ireland?", "Dublin", "Cork", "Belfast", "London"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare", "Charles Dickens", "Jane Austen", "Mark Twain"),
    ("Who wrote Pride and Prejudice?", "Jane Austen", "Emily Bronte", "Virginia Woolf", "George Eliot"),
    ("Who wrote the novel 1984?", "George Orwell", "Aldous Huxley", "Ray Bradbury", "H. G. Wells"),
    ("Who wrote The Odyssey?", "Homer", "Virgil", "Plato", "Sophocles"),
    ("Who wrote Don Quixote?", "Miguel de Cervantes", "Dante Alighieri", "Victor Hugo", "Leo Tolstoy"),
    ("Who wrote War and Peace?", "Leo Tolstoy", "Fyodor Dostoevsky", "Anton Chekhov", "Ivan Turgenev"),
    ("Who wrote Oliver Twist?", "Charles Dickens", "Thomas Hardy", "Lewis Carroll", "Oscar Wilde"),
    ("Who wrote Adventures of Huckleberry Finn?", "Mark Twain", "Herman Melville", "Jack London", "Edgar Allan Poe"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci", "Michelangelo", "Raphael", "Vincent van Gogh"),
    ("Who painted The Starry Night?", "Vincent van Gogh", "Claude Monet", "Pablo Picasso", "Rembrandt"),
    ("Who composed the Fifth Symphony that begins with four famous notes?", "Ludwig van Beethoven",
     "Wolfgang Amadeus Mozart", "Johann Sebastian Bach", "Frederic Chopin"),
    ("Who developed the theory of relativity?", "Albert Einstein", "Isaac Newton", "Niels Bohr", "Galileo Galilei"),
    ("Who proposed the theory of evolution by natural selection?", "Charles Darwin", "Gregor Mendel",
     "Louis Pasteur", "Isaac Newton"),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong", "Buzz Aldrin", "Yuri Gagarin",
     "John Glenn"),
    ("Who was the first president of the United States?", "George Washington", "Abraham Lincoln",
     "Thomas Jefferson", "John Adams"),
    ("Which planet is known as the Red Planet?", "Mars", "Venus", "Jupiter", "Mercury"),
    ("Which planet is the largest in our solar system?", "Jupiter", "Saturn", "Earth", "Neptune"),
    ("Which planet is closest to the Sun?", "Mercury", "Venus", "Mars", "Earth"),
    ("What is the closest star to the Earth?", "The Sun", "Sirius", "Polaris", "Alpha Centauri"),
    ("What do bees make?", "Honey", "Milk", "Silk", "Wax paper"),
    ("What gas do plants take in from the air to make food?", "Carbon dioxide", "Oxygen", "Helium", "Nitrogen"),
    ("What gas do humans need to breathe to live?", "Oxygen", "Carbon dioxide", "Hydrogen", "Neon"),
    ("What is the chemical symbol for water?", "H2O", "CO2", "O2", "NaCl"),
    ("What is the chemical symbol for gold?", "Au", "Ag", "Go", "Gd"),
    ("What is the boiling point of water at sea level in degrees Celsius?", "100", "50", "0", "212"),
    ("What is the freezing point of water in degrees Celsius?", "0", "100", "32", "-10"),
    ("How many legs does a spider have?", "Eight", "Six", "Ten", "Four"),
    ("How many legs does an insect have?", "Six", "Eight", "Four", "Ten"),
    ("How many days are in a week?", "Seven", "Five", "Ten", "Six"),
    ("How many months are in a year?", "Twelve", "Ten", "Eleven", "Thirteen"),
    ("How many hours are in a day?", "24", "12", "48", "60"),
    ("How many minutes are in an hour?", "60", "100", "24", "30"),
    ("How many continents are there on Earth?", "Seven", "Five", "Nine", "Four"),
    ("What is the largest ocean on Earth?", "The Pacific Ocean", "The Atlantic Ocean", "The Indian Ocean",
     "The Arctic Ocean"),
    ("What is the longest river in Africa?", "The Nile", "The Congo", "The Niger", "The Zambezi"),
    ("What is the tallest mountain on Earth?", "Mount Everest", "K2", "Mont Blanc", "Kilimanjaro"),
    ("What is the largest desert in Africa?", "The Sahara", "The Gobi", "The Kalahari", "The Atacama"),
    ("Which animal is the largest mammal?", "The blue whale", "The elephant", "The giraffe", "The hippopotamus"),
    ("Which animal is known as the king of the jungle?", "The lion", "The tiger", "The elephant", "The gorilla"),
    ("What do you call a baby cat?", "A kitten", "A puppy", "A calf", "A foal"),
    ("What do you call a baby dog?", "A puppy", "A kitten", "A lamb", "A cub"),
    ("What is the opposite of hot?", "Cold", "Warm", "Wet", "Bright"),
    ("What is the opposite of up?", "Down", "Left", "Over", "High"),
    ("What is the opposite of happy?", "Sad", "Glad", "Tall", "Fast"),
    ("What color is the sky on a clear day?", "Blue", "Green", "Red", "Purple"),
    ("What color are ripe bananas?", "Yellow", "Blue", "Purple", "Black"),
    ("What color is grass?", "Green", "Red", "Orange", "White"),
    ("What do you get when you mix blue and yellow paint?", "Green", "Purple", "Orange", "Brown"),
    ("What do you get when you mix red and white paint?", "Pink", "Green", "Blue", "Gray"),
    ("Which organ pumps blood through the body?", "The heart", "The liver", "The lungs", "The stomach"),
    ("Which organ do humans use to think?", "The brain", "The heart", "The kidney", "The skin"),
    ("How many bones are in the adult human body?", "206", "106", "306", "412"),
    ("What is the hardest natural substance?", "Diamond", "Gold", "Iron", "Granite"),
    ("What is the main language spoken in Brazil?", "Portuguese", "Spanish", "French", "English"),
    ("What is the main language spoken in Mexico?", "Spanish", "Portuguese", "English", "Italian"),
    ("What currency is used in Japan?", "The yen", "The won", "The yuan", "The dollar"),
    ("What currency is used in the United Kingdom?", "The pound sterling", "The euro", "The dollar", "The franc"),
    ("In which country are the pyramids of Giza?", "Egypt", "Mexico", "Peru", "Greece"),
    ("In which city is the Eiffel Tower?", "Paris", "London", "Rome", "Berlin"),
    ("In which city is the Colosseum?", "Rome", "Athens", "Paris", "Madrid"),
    ("In which country is the Great Wall?", "China", "Japan", "India", "Mongolia"),
    ("What is the smallest prime number?", "2", "1", "3", "0"),
    ("How many sides does a triangle have?", "Three", "Four", "Five", "Six"),
    ("How many sides does a hexagon have?", "Six", "Five", "Eight", "Seven"),
    ("How many degrees are in a right angle?", "90", "180", "45", "360"),
    ("What is the square root of 81?", "9", "8", "7", "18"),
    ("What shape has four equal sides and four right angles?", "A square", "A triangle", "A circle",
     "A pentagon"),
    ("What instrument has black and white keys?", "The piano", "The guitar", "The violin", "The drum"),
    ("Which season comes after winter?", "Spring", "Summer", "Autumn", "Winter again"),
    ("Which month comes after March?", "April", "May", "February", "June"),
    ("Which day comes after Monday?", "Tuesday", "Sunday", "Wednesday", "Friday"),
    ("What do caterpillars turn into?", "Butterflies", "Spiders", "Beetles", "Snails"),
    ("What is frozen water called?", "Ice", "Steam", "Fog", "Sand"),
    ("What force pulls objects toward the Earth?", "Gravity", "Magnetism", "Friction", "Electricity"),
    ("What is the main ingredient of bread?", "Flour", "Sugar", "Rice", "Salt"),
    ("Which metal is liquid at room temperature?", "Mercury", "Iron", "Copper", "Aluminium"),
    ("What is the largest planet's most famous feature, a giant storm, called?", "The Great Red Spot",
     "The Blue Eye", "The Dark Ring", "The White Cloud"),
]

NAMES = ["Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Keiko", "Liam"]
THINGS = ["apples", "books", "pencils", "marbles", "stamps", "cookies", "shells", "coins"]
COLORS = ["red", "blue", "green", "yellow", "black", "white"]
PETS = ["a dog", "a cat", "a rabbit", "a parrot", "a hamster", "a turtle"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Dublin", "Quebec", "Porto"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve"]
WORDS = ["river", "garden", "window", "planet", "silver", "market", "candle", "forest", "pocket", "ladder"]


def numbers(rng: random.Random, answer: int) -> list[str]:
    """Three wrong answers near ``answer``."""
    wrong: set[int] = set()
    while len(wrong) < 3:
        other = answer + rng.choice([-10, -2, -1, 1, 2, 10, 3, -3])
        if other != answer and other >= 0:
            wrong.add(other)
    return [str(w) for w in sorted(wrong)]


def choice_item(rng: random.Random, kind: str, question: str, right: str, wrong: list[str]) -> dict:
    choices = [right, *wrong]
    rng.shuffle(choices)
    return {"kind": kind, "question": question, "choices": choices, "answer": choices.index(right)}


def multiple_choice(rng: random.Random) -> list[dict]:
    items = [choice_item(rng, "fact", q, right, list(wrong)) for q, right, *wrong in FACTS]
    for _ in range(100):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        op = rng.choice("+-x")
        if op == "-":
            a, b = max(a, b), min(a, b)
        value = {"+": a + b, "-": a - b, "x": a * b}[op]
        if op == "x":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            value = a * b
        items.append(choice_item(rng, "arithmetic", f"What is {a} {'times' if op == 'x' else op} {b}?", str(value),
                                 numbers(rng, value)))
    for _ in range(80):
        name, other = rng.sample(NAMES, 2)
        count, color, pet, city = rng.randint(2, 9), rng.choice(COLORS), rng.choice(PETS), rng.choice(CITIES)
        thing = rng.choice(THINGS)
        story = (f"{name} lives in {city} with {pet}. {name} has {count} {thing} and a {color} bicycle. "
                 f"{other} visits {name} every Sunday.")
        asked = rng.choice(["count", "color", "pet", "city", "visitor"])
        right, wrong = {
            "count": (str(count), [str(n) for n in rng.sample([n for n in range(2, 10) if n != count], 3)]),
            "color": (color, rng.sample([c for c in COLORS if c != color], 3)),
            "pet": (pet, rng.sample([p for p in PETS if p != pet], 3)),
            "city": (city, rng.sample([c for c in CITIES if c != city], 3)),
            "visitor": (other, rng.sample([n for n in NAMES if n not in (name, other)], 3)),
        }[asked]
        question = {"count": f"How many {thing} does {name} have?", "color": f"What color is {name}'s bicycle?",
                    "pet": f"Which animal lives with {name}?", "city": f"Where does {name} live?",
                    "visitor": f"Who visits {name} every Sunday?"}[asked]
        items.append(choice_item(rng, "reading", f"{story}\n{question}", right, wrong))
    return items


def generated(rng: random.Random) -> list[dict]:
    items = []
    for _ in range(40):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        items.append({"kind": "arithmetic", "prompt": f"What is {a} plus {b}? Answer with the number only.",
                      "answers": [str(a + b)]})
    for word in WORDS:
        items.append({"kind": "instruction", "prompt": f"Repeat this word exactly and nothing else: {word}",
                      "answers": [word]})
        items.append({"kind": "instruction", "prompt": f"Write the word \"{word}\" in capital letters.",
                      "answers": [word.upper()], "case": True})
        items.append({"kind": "instruction", "prompt": f"What is the first letter of the word \"{word}\"? "
                      "Answer with one letter.", "answers": [word[0]]})
    for n in range(1, 13):
        items.append({"kind": "instruction", "prompt": f"Write the number {NUMBER_WORDS[n]} as digits.",
                      "answers": [str(n)]})
    for _ in range(20):
        a, b = rng.sample(range(1, 50), 2)
        items.append({"kind": "instruction", "prompt": f"Is {a} larger than {b}? Answer yes or no.",
                      "answers": ["yes" if a > b else "no"]})
    for q, right, *_ in FACTS[:25]:  # the capitals, asked to be answered in a word
        items.append({"kind": "fact", "prompt": f"{q} Answer in one word.", "answers": [right]})
    return items


def main() -> None:
    rng = random.Random(20261208)
    for name, rows in (("multiple_choice", multiple_choice(rng)), ("generated", generated(rng))):
        (OUT / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{OUT / name}.jsonl: {len(rows)} items")


if __name__ == "__main__":
    main()
