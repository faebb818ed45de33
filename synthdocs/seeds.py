"""Randomised details put into prompts to keep the corpus diverse (against mode collapse).

Every idea and document prompt gets its own draw of names, places, a date and a style,
from a ``random.Random`` seeded by the run seed and the item's key, so a rerun draws the
same details (and so hits the call cache) while different items differ.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random

FIRST = ["Amara", "Bilal", "Camille", "Dmitri", "Esther", "Farid", "Greta", "Hiroshi", "Ines", "Jonas", "Kavya", "Lorenzo", "Mei", "Nnamdi", "Olga", "Pradeep", "Quinn", "Rosa", "Soren", "Tamar", "Ulrich", "Valentina", "Wen", "Ximena", "Yusuf", "Zofia", "Aurelio", "Brigid", "Caleb", "Delphine", "Emeka", "Fiona", "Gideon", "Hana", "Ivo", "Jada", "Kofi", "Leila", "Mateus", "Noor", "Oskar", "Priya", "Rafael", "Sunniva", "Tobias", "Uma", "Viktor", "Wanjiru"]
LAST = ["Adeyemi", "Bergstrom", "Castellano", "Dubois", "Eriksen", "Fonseca", "Gallagher", "Haddad", "Iwasaki", "Jankowski", "Kowalczyk", "Lindqvist", "Mbeki", "Nakamura", "Okonkwo", "Petrov", "Quintero", "Rahman", "Silva", "Takahashi", "Umarov", "Varga", "Whitfield", "Xu", "Yilmaz", "Zeller", "Abernathy", "Brennan", "Chaudhry", "Delacroix", "Esposito", "Fairbanks", "Grunewald", "Holloway", "Ibarra", "Jovanovic", "Kaplan"]
PLACES = ["Austin", "Toronto", "London", "Berlin", "Nairobi", "Seoul", "Melbourne", "Dublin", "Boston", "Chicago", "Singapore", "Lisbon", "Denver", "Montreal", "Bangalore", "Stockholm", "Oakland", "Pittsburgh", "Edinburgh", "Wellington", "Atlanta", "Zurich", "Cape Town", "Seattle", "Amsterdam", "Mexico City", "Tel Aviv", "Helsinki", "Raleigh", "Vancouver"]
STYLES = ["dry and factual", "warm and personal", "sharply critical", "enthusiastic", "measured and academic", "sardonic", "worried", "legalistic", "conversational", "terse", "investigative", "nostalgic", "technical and precise", "folksy"]

DEFAULT_DOC_TYPES = [
    "news article", "blog post", "forum thread", "op-ed", "internal memo", "newsletter",
    "podcast transcript", "court filing", "academic paper excerpt", "social media thread",
    "magazine feature", "employee handbook excerpt", "investor call summary", "congressional testimony",
    "Q&A column", "book excerpt", "press release", "Reddit post", "email to colleagues", "lecture notes",
]


def rng_for(seed: int, *key: object) -> random.Random:
    digest = hashlib.sha256(repr((seed, *key)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def world_date(rng: random.Random, today: str, max_days_back: int = 400) -> str:
    try:
        end = dt.date.fromisoformat(today)
    except ValueError:
        return today
    return (end - dt.timedelta(days=rng.randint(0, max_days_back))).strftime("%d %B %Y").lstrip("0")


def idea_inspiration(rng: random.Random) -> str:
    return (
        f"consider authors such as {person(rng)} or {person(rng)}, settings such as {rng.choice(PLACES)} or "
        f"{rng.choice(PLACES)}, and a {rng.choice(STYLES)} tone."
    )


def document_details(rng: random.Random, today: str) -> str:
    return (
        f"author or main voice {person(rng)}; another person who may appear: {person(rng)}; "
        f"place {rng.choice(PLACES)}; dated {world_date(rng, today)}; tone {rng.choice(STYLES)}"
    )
